"""Quantized modules as opaque custom ops, so ``torch.compile`` graphs (the compiled decode step) keep them whole.

``QuantLinear`` / ``QuantExperts`` / ``QuantEmbedding`` run ctypes kernels, lazy repacks and host-side expert
dispatch, none of which dynamo can trace; each such call would split the graph (measured no faster than eager).
While dynamo traces, their ``forward`` (and ``QuantLinear.weight``) call the ops below instead: one node per
module call, whose real implementation is the module's eager code and whose fake implementation gives the
output shape.  The op finds its module by a handle (``register``, done when the module is built and again by
``register_all``): a weak table from ``id(module)`` to the module, so a handle never keeps a model alive.
Outside compilation nothing here runs.  GGUF formats take kimiq's C++ operators instead where they are built
(``kimiq.ops.qops``: no Python per call); these ops remain for mlx formats, large int4 experts and machines
without a C++ compiler.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["register", "register_all"]

_MODULES: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def register(module: nn.Module) -> int:
    """Enter ``module`` in the table (eagerly: dynamo defers side effects while it traces) and return its handle,
    also kept as ``module.opaque_handle`` for its ``forward`` to pass to the op."""
    _MODULES[id(module)] = module
    module.opaque_handle = id(module)
    return id(module)


def register_all(model: nn.Module) -> int:
    """Register every module of ``model`` that has an opaque op (after copies, handles must be renewed)."""
    mods = [m for m in model.modules() if hasattr(m, "eager_forward")]
    for m in mods:
        register(m)
    return len(mods)


def _module(handle: int) -> nn.Module:
    m = _MODULES.get(handle)
    if m is None:
        raise RuntimeError("a compiled graph outlived its quantized module (kimiq.quant.opaque handle)")
    return m


@torch.library.custom_op("kimiq::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _module(handle).eager_forward(x)  # fresh storage (a custom op may not return a view of x)


@quant_linear.register_fake
def _(x, handle):
    return x.new_empty(*x.shape[:-1], _module(handle).out_features)


@torch.library.custom_op("kimiq::quant_weight", mutates_args=())
def quant_weight(handle: int) -> torch.Tensor:
    return _module(handle).dequantized_weight().clone()  # the module keeps its copy; an op returns fresh storage


@quant_weight.register_fake
def _(handle):
    m = _module(handle)
    return torch.empty(m.out_features, m.in_features, dtype=m.compute_dtype)


@torch.library.custom_op("kimiq::quant_experts", mutates_args=())
def quant_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, handle: int) -> torch.Tensor:
    return _module(handle).eager_forward(x, weights, idx)


@quant_experts.register_fake
def _(x, weights, idx, handle):
    return torch.empty_like(x)


@torch.library.custom_op("kimiq::quant_embedding", mutates_args=())
def quant_embedding(ids: torch.Tensor, handle: int) -> torch.Tensor:
    return _module(handle).eager_forward(ids)


@quant_embedding.register_fake
def _(ids, handle):
    m = _module(handle)
    return torch.empty(*ids.shape, m.embedding_dim, dtype=m.compute_dtype)
