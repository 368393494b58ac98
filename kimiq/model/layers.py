"""Small shared building blocks: RMSNorm, the sigmoid-gated per-head RMSNorm, SwiGLU MLP.

Precision follows the references (``kimi-linear-architecture.md`` §3.5, §6):

* ``RMSNorm`` normalises in fp32, casts back to the input dtype, **then** multiplies by the
  weight (HF ``KimiRMSNorm`` / T5 order).
* ``GatedRMSNorm`` stays in fp32 throughout (norm, weight, sigmoid gate) with one cast at
  the end, as fla's ``FusedRMSNormGated`` and transformers-native do.  Kimi gates with
  **sigmoid**, not fla's default swish.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "GatedRMSNorm", "MLP"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """``y = rmsnorm(x) * weight * sigmoid(gate)`` over the last dim (one head), fp32 inside."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float() * torch.sigmoid(gate.float())).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
