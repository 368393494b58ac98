"""Sigmoid-routed mixture of experts with a shared expert (``kimi-linear-architecture.md`` §5).

Router (``gate``), fp32 throughout, vLLM / transformers-native semantics::

    s      = sigmoid(x @ gate.weight^T)                        [N, E]
    choice = s + e_score_correction_bias                        selection only
    grouped top-k on choice (group score = sum of the top-2 in a group; keep topk_group groups)
    w      = s[topk]                                            unbiased scores (not HF remote's biased ones,
                                                                unless cfg.router_bias_in_weights)
    w      = w / (sum(w) + 1e-20)   if renormalize
    w      = w * routed_scaling_factor

Experts are stacked per projection, checkpoint roles kept: ``w1`` gate [E, I, D],
``w3`` up [E, I, D], ``w2`` down [E, D, I].  Output = sum_k w_k E_k(x) + shared_experts(x).
The reference dispatch gathers each expert's tokens once and loops over the experts hit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kimiq.config import MoEConfig
from kimiq.model.layers import MLP

__all__ = ["Router", "Experts", "SparseMoE", "dispatch"]


class Router(nn.Module):
    def __init__(self, hidden: int, m: MoEConfig, bias_in_weights: bool = False):
        super().__init__()
        self.m = m
        self.bias_in_weights = bias_in_weights
        self.weight = nn.Parameter(torch.empty(m.num_experts, hidden))  # kept fp32
        # a buffer, not a parameter: trained by the aux-loss-free update, never by gradients; kept fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(m.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (weights [N, k] fp32, expert ids [N, k] int64)."""
        m = self.m
        s = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [N, E]
        choice = s + self.e_score_correction_bias.float()
        if m.use_grouped_topk and m.num_expert_group > 1:
            N = x.shape[0]
            grouped = choice.view(N, m.num_expert_group, -1)  # [N, G, E/G]
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(m.topk_group, dim=-1).indices
            gmask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~gmask.unsqueeze(-1), float("-inf")).view(N, -1)
        idx = choice.topk(m.num_experts_per_token, dim=-1).indices  # [N, k]
        w = (choice if self.bias_in_weights else s).gather(1, idx)
        if m.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * m.routed_scaling_factor, idx


class Experts(nn.Module):
    def __init__(self, hidden: int, m: MoEConfig):
        super().__init__()
        E, I = m.num_experts, m.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, I, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(E, I, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(E, hidden, I))  # down

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x: [N, D], weights/idx: [N, k] -> [N, D].  Tokens grouped by expert, one matmul each."""

        def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
            h = F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())
            return h @ self.w2[e].t()

        return dispatch(x, weights, idx, self.w1.shape[0], expert)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``forward``'s sum as reductions over each token's k chosen experts, in fp32: no host sync and no
        Python loop over experts.  Eagerly it copies the chosen [N, k, I, D] weights (slow); under
        torch.compile inductor fuses the gather into the reductions, so decode reads just those rows."""
        xf = x.float()[:, None, None, :]  # [N, 1, 1, D]
        gate = (self.w1[idx].float() * xf).sum(-1)  # [N, k, I]
        up = (self.w3[idx].float() * xf).sum(-1)
        h = (F.silu(gate) * up)[:, :, None, :]  # [N, k, 1, I]
        y = (self.w2[idx].float() * h).sum(-1)  # [N, k, D]
        return (y * weights[..., None]).sum(1).to(x.dtype)


def dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Grouped routing shared by ``Experts`` and quantized twins: ``sum_k weights[:, k] * expert(idx[:, k], x)``.

    Each expert's tokens are gathered once and ``expert(e, x_e)`` runs on them ([n_e, D] -> [n_e, D]).
    """
    N, k = idx.shape
    if N == 1:  # decode: the k experts of the one token, ascending as below (same sums, far fewer ops)
        out = None
        for e, w in sorted(zip(idx[0].tolist(), weights[0].tolist())):
            y = (expert(e, x) * w).to(x.dtype)
            out = y if out is None else out + y
        return out
    flat = idx.reshape(-1)  # [N*k]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // k  # token row of each sorted assignment
    xs = x.index_select(0, token_of)  # [N*k, D] grouped by expert
    ws = weights.reshape(-1).index_select(0, order)  # [N*k] fp32
    out = torch.zeros_like(x)
    # split, not xs[start:start + cnt]: a slice's backward zero-fills a full [N*k, D] gradient per expert
    for e, (xe, we, te) in enumerate(zip(xs.split(counts), ws.split(counts), token_of.split(counts))):
        if xe.shape[0] == 0:
            continue
        y = expert(e, xe) * we[:, None]
        out.index_add_(0, te, y.to(out.dtype))
    return out


class SparseMoE(nn.Module):
    """``block_sparse_moe``: router ``gate``, stacked ``experts``, ``shared_experts``."""

    def __init__(self, hidden: int, m: MoEConfig, bias_in_weights: bool = False):
        super().__init__()
        self.gate = Router(hidden, m, bias_in_weights)
        self.experts = Experts(hidden, m)
        shared = m.moe_intermediate_size * m.num_shared_experts
        self.shared_experts = MLP(hidden, shared) if m.num_shared_experts else None

    def forward(self, x: torch.Tensor, *, gathered: bool = False) -> torch.Tensor:
        """``gathered``: plain-tensor experts run ``Experts.gathered`` (no host sync: what the compiled decode step
        uses for a few tokens); quantized twins keep their own dispatch either way."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        w, idx = self.gate(flat)
        if gathered and isinstance(self.experts, Experts):
            out = self.experts.gathered(flat, w, idx)
        else:
            out = self.experts(flat, w, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
