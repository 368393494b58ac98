"""fla's Triton KDA kernels behind kimiq's KDA op signature (``kimiq.ops.kda``).

Used only when a model is built with ``kda_impl="fla"`` (CUDA + ``pip install kimiq[kernels]``);
importing this module imports fla, so nothing imports it implicitly.  Inputs follow the
reference contract: q and k already L2-normalised, g in log space (fp32), beta after the
sigmoid, fp32 K-first state ``[B, H, K, V]`` — exactly what fla's ``chunk_kda`` /
``fused_recurrent_kda`` take with all in-kernel options off (``state_v_first=False``).
fla picks the recurrent kernel for short inputs, as HF remote code does (T <= 64).
"""

from __future__ import annotations

import torch

try:
    from fla.ops.kda import chunk_kda as _fla_chunk
    from fla.ops.kda import fused_recurrent_kda as _fla_recurrent
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kda_impl='fla' needs flash-linear-attention with Triton on a GPU: pip install 'kimiq[kernels]'"
    ) from e

__all__ = ["fla_kda"]


def fla_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    if not q.is_cuda:
        raise RuntimeError("fla KDA kernels need CUDA tensors; use kda_impl='torch' on CPU")
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise TypeError("KDA recurrent state must be fp32")
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)  # fla computes in fp32 internally; inputs in the activation dtype
    fn = _fla_recurrent if q.shape[1] <= 64 else _fla_chunk
    o, S = fn(
        q,
        k,
        v,
        g.float(),
        beta.to(dtype),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    return o, S
