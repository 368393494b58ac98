"""Importance matrix: the mean squared input activation per input column of every matmul weight.

    imatrix = collect_imatrix(model, token_windows)      # {checkpoint tensor name: float32 [in_features]}
    save_imatrix(imatrix, "imatrix.safetensors", meta)   # what ``kimiq quantize --imatrix`` reads

As llama.cpp's ``llama-imatrix`` (``../shared/reference/quantization-formats.md`` §4): for a weight
``W [out, in]`` fed rows ``x``, ``qw[j] = sum_rows x_j^2 / n_rows``; routed experts count only the
tokens routed to them (the down projection sees its own input, ``silu(x W1^T) * (x W3^T)``), and an
expert no token reached gets ``qw = 1``.  The quantizers weight each element's squared error by
``qw[j]`` (times ``sqrt(sigma2 + x^2)`` for the k-quants), i.e. the expected squared output error.
Collected on the full-precision model with forward pre-hooks; model code is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimiq.model.moe import Experts

__all__ = ["collect_imatrix", "save_imatrix"]


class _Acc:
    """Running sum of x^2 per column and the number of rows, per tensor (and per expert)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [rows, in]
        s = x2.pow(2).sum(0)
        if name in self.sums:
            self.sums[name] += s
        else:
            self.sums[name] = s
        self.counts[name] = self.counts.get(name, 0) + x2.shape[0]


def _expert_hook(acc: _Acc, prefix: str, mod: Experts) -> Callable:
    def hook(_m, args):
        x, _weights, idx = args  # x [N, D], idx [N, k]
        for e in idx.unique().tolist():
            xe = x[(idx == e).any(-1)]  # the tokens routed to expert e
            acc.add(f"{prefix}.{e}.w1.weight", xe)
            acc.add(f"{prefix}.{e}.w3.weight", xe)
            h = F.silu(xe @ mod.w1[e].t()) * (xe @ mod.w3[e].t())
            acc.add(f"{prefix}.{e}.w2.weight", h)

    return hook


@torch.inference_mode()
def collect_imatrix(model: nn.Module, windows: Iterable[torch.Tensor],
                    progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` over token windows (``[1, T]`` each, a fresh state per window) and return the
    mean squared activation per input column for every Linear weight and every expert projection.
    The model must be unquantized (the statistics are for quantizing it).  ``lm_head`` is left out
    (llama.cpp's default too: its input is collected only with ``--process-output``)."""
    acc = _Acc()
    handles = []
    try:
        for path, mod in model.named_modules():
            if type(mod) is nn.Linear and path != "lm_head":  # the head sees only the last row (last_only)
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, name=f"{path}.weight": acc.add(name, args[0])))
            elif isinstance(mod, Experts):
                handles.append(mod.register_forward_pre_hook(_expert_hook(acc, path, mod)))
        for i, ids in enumerate(windows):
            model(ids, model.new_state(ids.shape[0], capacity=ids.shape[1]), last_only=True)
            if progress is not None:
                progress(i)
    finally:
        for h in handles:
            h.remove()
    out = {n: (s / acc.counts[n]).contiguous() for n, s in acc.sums.items()}
    for path, mod in model.named_modules():  # experts never routed to: qw = 1 (llama.cpp's loader does the same)
        if isinstance(mod, Experts):
            for e in range(mod.w1.shape[0]):
                for proj, width in (("w1", mod.w1.shape[2]), ("w3", mod.w3.shape[2]), ("w2", mod.w2.shape[2])):
                    out.setdefault(f"{path}.{e}.{proj}.weight", torch.ones(width))
    bad = [n for n, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite activations while collecting the imatrix: {bad[:5]}")
    return out


def save_imatrix(imatrix: dict[str, torch.Tensor], path: str | Path, meta: dict | None = None) -> Path:
    """Write as safetensors (name -> float32 [in]); ``meta`` (dataset, tokens, windows) goes in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.float().contiguous() for k, v in imatrix.items()}, str(tmp),
              metadata={"kimiq.imatrix": json.dumps(meta or {})})
    tmp.replace(path)
    return path
