"""Kimi Delta Attention layer (``kimi-linear-architecture.md`` §3), checkpoint names kept.

    x: [B, T, D]  ->  q/k/v = SiLU(short_conv(x @ W^T))          separate convs, raw taps cached
                      g     = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)   fp32, no lower bound
                      beta  = sigmoid(b_proj(x))                               fp32
                      q, k  = l2norm(q), l2norm(k)    (eps 1e-6; scale K^-1/2 applied in the op)
                      o     = KDA(q, k, v, g, beta, S)                          fp32 state
                      y     = o_proj(GatedRMSNorm(o, g_b(g_a(x))))              sigmoid gate

Rows shorter than T (``n_valid``) get beta = 0 and g = 0 beyond their end, which leaves
their recurrent state untouched, and their conv taps are gathered at their own end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimiq.config import ModelConfig
from kimiq.model.layers import GatedRMSNorm
from kimiq.model.state import KDAState
from kimiq.ops.kda import kda, kda_decode_

__all__ = ["KimiDeltaAttention", "ShortConv"]


class ShortConv(nn.Module):
    """Causal depthwise conv over time, no bias (fla ``ShortConvolution``); weight [C, 1, W].

    ``w[..., W-1]`` multiplies the current token.  The caller applies SiLU.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))

    def forward(self, x: torch.Tensor, taps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; taps: [B, C, W-1] previous raw inputs (None = zeros).

        Returns (y [B, T, C], xcat [B, C, W-1+T]) where xcat holds taps then x, for the
        caller to gather new taps from.
        """
        B, T, C = x.shape
        W = self.weight.shape[-1]
        xt = x.transpose(1, 2)  # [B, C, T]
        if taps is None:
            taps = xt.new_zeros(B, C, W - 1)
        xcat = torch.cat([taps.to(xt.dtype), xt], dim=-1)  # [B, C, W-1+T]
        w = self.weight.to(xt.dtype)
        if T == 1:  # decode: one dot of W taps per channel (conv1d's setup costs ~10x this)
            return (xcat * w[:, 0]).sum(-1).unsqueeze(1), xcat  # [B, 1, C]
        y = F.conv1d(xcat, w, groups=C)  # [B, C, T]
        return y.transpose(1, 2), xcat


def l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim in fp32 (fla ``l2norm``)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, impl: str = "torch"):
        super().__init__()
        D = cfg.hidden_size
        H, K = cfg.kda.num_heads, cfg.kda.head_dim
        P = H * K
        W = cfg.kda.short_conv_kernel_size
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = H, K
        self.l2norm_eps = cfg.kda_l2norm_eps
        self.impl = impl
        self.q_proj = nn.Linear(D, P, bias=False)
        self.k_proj = nn.Linear(D, P, bias=False)
        self.v_proj = nn.Linear(D, P, bias=False)
        self.q_conv1d = ShortConv(P, W)
        self.k_conv1d = ShortConv(P, W)
        self.v_conv1d = ShortConv(P, W)
        # fp32 parameters (kept fp32 whatever the model dtype; see weights.keep_fp32)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1))
        self.dt_bias = nn.Parameter(torch.empty(P))
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, P, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, P, bias=False)
        self.o_norm = GatedRMSNorm(K, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(P, D, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Forget gate in log space, fp32: [B, T, H, K], all <= 0 (no lower bound for Kimi-Linear)."""
        B, T, _ = x.shape
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        f = f.view(B, T, self.num_heads, self.head_dim)
        return -self.A_log.float().exp() * F.softplus(f)  # softplus is linear above 20, as fla

    def forward(
        self,
        x: torch.Tensor,
        state: KDAState | None = None,
        valid: torch.Tensor | None = None,
        n_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, D]; valid: [B, T] bool (right-padded rows), n_valid: [B]. Updates ``state`` in place."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        conv_out = []
        for name, proj, conv in (
            ("conv_q", self.q_proj, self.q_conv1d),
            ("conv_k", self.k_proj, self.k_conv1d),
            ("conv_v", self.v_proj, self.v_conv1d),
        ):
            taps = getattr(state, name) if state is not None else None
            y, xcat = conv(proj(x), taps)
            conv_out.append(F.silu(y))
            if state is not None:
                Wm1 = taps.shape[-1]
                if n_valid is None:
                    new_taps = xcat[:, :, T:]  # last W-1 columns
                else:  # row b ends at column (W-1) + n_valid[b]
                    idx = (n_valid.view(B, 1, 1) + torch.arange(Wm1, device=x.device).view(1, 1, Wm1)).expand(
                        B, xcat.shape[1], Wm1
                    )
                    new_taps = xcat.gather(2, idx)
                taps.copy_(new_taps)
        q, k, v = (t.view(B, T, H, K) for t in conv_out)  # [B, T, H, K]
        q = l2norm(q, self.l2norm_eps)
        k = l2norm(k, self.l2norm_eps)
        g = self.gate(x)
        beta = torch.sigmoid(self.b_proj(x).float())  # [B, T, H]
        if valid is not None:
            g = g * valid[:, :, None, None]
            beta = beta * valid[:, :, None]
        if state is not None and T == 1 and self.impl in ("torch", "compile"):  # decode: in place, fused on CPU
            o = kda_decode_(state.recurrent, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], K**-0.5)[:, None]
        else:
            o, S = kda(
                q,
                k,
                v,
                g,
                beta,
                scale=K**-0.5,
                initial_state=state.recurrent if state is not None else None,
                output_final_state=state is not None,
                impl=self.impl,
            )
            if state is not None:
                state.recurrent.copy_(S)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        y = self.o_norm(o.to(x.dtype), gate).reshape(B, T, H * K)
        return self.o_proj(y)
