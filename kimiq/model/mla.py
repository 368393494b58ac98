"""Multi-head latent attention, Kimi-Linear flavour (``kimi-linear-architecture.md`` §4).

NoPE and no q-LoRA: the 64 "rope" dims are a shared, never-rotated key slice.

    q           = q_proj(x)                       [B, T, H, nope + rope]
    c, k_pe     = kv_a_proj_with_mqa(x)           [B, T, R], [B, T, rope]
    c           = kv_a_layernorm(c)               eps: cfg.kv_a_layernorm_eps (1e-6, as HF/transformers)
    cache       <- [c | k_pe]                      R + rope values per token (576 for the 48B)
    k_nope, v   = kv_b_proj(c) per head           [B, S, H, nope], [B, S, H, v]
    attn        = softmax(q . [k_nope | k_pe] * (nope + rope)^-1/2, causal) v
    out         = o_proj(attn)

Two equivalent paths, picked by query length (``absorb_max_tokens``):

* expanded (prefill): decompress cached latents to per-head keys/values, run SDPA;
* absorbed (decode): fold ``W_UK`` into the query and ``W_UV`` into the output so attention
  runs directly over the latent cache ([B, S, R + rope]) — valid because nothing is rotated.

Causality with per-row lengths: query t of row b sits at absolute position ``L_b + t`` and
sees cache slots ``j <= L_b + t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimiq.config import ModelConfig
from kimiq.model.layers import RMSNorm
from kimiq.model.state import MLAState
from kimiq.ops import qops

__all__ = ["KimiMLAAttention", "split_kv_b"]


def split_kv_b(weight: torch.Tensor, num_heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj.weight`` [H*(nope+v), R] -> (W_UK [H, nope, R], W_UV [H, v, R]): per head, the rows that
    up-project the latent to k_nope, then to v (the absorbed decode and the GGUF / mlx exporters use this)."""
    w = weight.view(num_heads, nope + v_dim, -1)
    return w[:, :nope], w[:, nope:]


class KimiMLAAttention(nn.Module):
    absorb_max_tokens = 4  # queries per row at or below which the absorbed path runs

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mla
        self.layer_idx = layer_idx
        self.num_heads = m.num_heads
        self.nope, self.rope = m.qk_nope_head_dim, m.qk_rope_head_dim
        self.v_dim, self.rank = m.v_head_dim, m.kv_lora_rank
        self.scale = m.qk_head_dim**-0.5
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, m.num_heads * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, cfg.kv_a_layernorm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(m.num_heads * m.v_head_dim, D, bias=False)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> cache entries [B, T, R + rope] (normalised c, then k_pe)."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        return torch.cat([self.kv_a_layernorm(c), k_pe], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        state: MLAState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, D]; ``lengths[B]``: tokens already cached per row (before this call)."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.nope + self.rope)
        new = self.latent(x)  # [B, T, R + rope]
        if state is None:
            kv = new
            mask = None  # plain causal over the T new tokens
        else:
            assert lengths is not None
            L = int(lengths.max())
            state.ensure_capacity(L + T)
            pos = lengths.view(B, 1) + torch.arange(T, device=x.device).view(1, T)  # [B, T] absolute positions
            rows = torch.arange(B, device=x.device).view(B, 1)
            state.latent.index_put_((rows, pos), new.to(state.latent.dtype))  # (scatter_ copied the whole buffer)
            S = L + T
            kv = state.latent[:, :S].to(x.dtype)
            # an empty cache (a first prefill): plain causal, which SDPA runs without a mask (its fused kernel)
            mask = None if L == 0 else torch.arange(S, device=x.device).view(1, 1, S) <= pos.unsqueeze(-1)  # [B, T, S]
        if T <= self.absorb_max_tokens:
            out = self._absorbed(q, kv, mask)
        else:
            out = self._expanded(q, kv, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def decode(self, x: torch.Tensor, past: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row without touching the cache: x [B, 1, D]; ``past`` [B, L, R + rope] the cached
        entries (slot j of row b valid for j < lengths[b]); returns (y [B, 1, D], the new entries [B, 1, R + rope]
        for the caller to store at ``lengths``).  The absorbed form, with the new token's score and value kept
        apart so ``past`` is only read (no cat of the cache); the compiled decode step runs this.  On CPU with
        kimiq's C++ operators loaded and an fp32 or bf16 cache, the attention over the cache is
        ``kimiq_cpu::mla_decode`` (one pass, online softmax, fp32 accumulation), else the einsums below."""
        B, L = x.shape[0], past.shape[1]
        H = self.num_heads
        q = self.q_proj(x).view(B, H, self.nope + self.rope)
        new = self.latent(x)  # [B, 1, R + rope]
        if past.dtype != new.dtype:  # a cache in another dtype (model.cache_dtype): attend to the entry as stored
            new = new.to(past.dtype).to(new.dtype)
        w_uk, w_uv = split_kv_b(self.kv_b_proj.weight, H, self.nope, self.v_dim)  # [H, nope, R], [H, v, R]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_pe], dim=-1)  # [B, H, R + rope]
        if x.device.type == "cpu" and qops.loaded() and past.dtype in (torch.float32, torch.bfloat16):  # one pass
            o_lat = torch.ops.kimiq_cpu.mla_decode(q_lat, past, new[:, 0], lengths, self.scale, self.rank)  # [B, H, R]
            o = torch.einsum("bhr,hvr->bhv", o_lat.to(x.dtype), w_uv)  # [B, H, v]
            return self.o_proj(o.reshape(B, 1, H * self.v_dim)), new
        # one product over whole (contiguous) cache rows: q_lat . c + q_pe . k_pe
        # half-precision batched matmuls over the cache are slow on CPU (bf16 [4, 288] x [288, 550]: 330 µs, fp32 MKL
        # ~10x less); compiled, they become one fused multiply-reduce with fp32 accumulation instead
        fused = torch.compiler.is_compiling() and (x.dtype != torch.float32 or past.dtype != x.dtype)
        if fused:
            s_past = (q_lat.float().unsqueeze(2) * past.unsqueeze(1).float()).sum(-1)  # [B, H, L]
        else:
            s_past = torch.einsum("bhd,bld->bhl", q_lat, past.to(x.dtype))  # [B, H, L]
        s_new = (q_lat * new).sum(-1, keepdim=True)  # [B, H, 1]
        scores = torch.cat([s_past, s_new], dim=-1).float() * self.scale  # [B, H, L + 1]
        valid = torch.arange(L, device=x.device).view(1, L) < lengths.view(B, 1)  # [B, L]
        valid = torch.cat([valid, valid.new_ones(B, 1)], dim=-1)  # the new token: always
        p = scores.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(-1).to(x.dtype)
        p_past, p_new = p.split([L, 1], dim=-1)
        if fused:
            o_lat = ((p_past.float().unsqueeze(-1) * past.unsqueeze(1).float()).sum(-2) + p_new * new).to(x.dtype)
        else:
            o_lat = torch.einsum("bhl,bld->bhd", p_past, past.to(x.dtype)) + p_new * new  # [B, H, R + rope]
        o = torch.einsum("bhr,hvr->bhv", o_lat[..., : self.rank], w_uv)  # [B, H, v]
        return self.o_proj(o.reshape(B, 1, H * self.v_dim)), new

    def _expanded(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H, _ = q.shape
        S = kv.shape[1]
        c, k_pe = kv.split([self.rank, self.rope], dim=-1)
        kvb = self.kv_b_proj(c).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope)], dim=-1)  # [B, S, H, nope + rope]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, *, d]
        pad = qh.shape[-1] - self.v_dim
        if pad > 0 and qh.device.type == "cpu":  # v zero-padded to q/k's head dim: the CPU flash kernel wants equal
            vh = F.pad(vh, (0, pad))  # dims (else SDPA's math path, 2.2x slower at 512 tokens); padded outputs are 0
        if mask is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.unsqueeze(1), scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2)  # [B, T, H, v]

    def _absorbed(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H, _ = q.shape
        S = kv.shape[1]
        w_uk, w_uv = split_kv_b(self.kv_b_proj.weight, H, self.nope, self.v_dim)  # [H, nope, R], [H, v, R]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c, k_pe = kv.split([self.rank, self.rope], dim=-1)  # [B, S, R], [B, S, rope]
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # [B, H, T, R]
        scores = torch.einsum("bhtr,bsr->bhts", q_lat, c) + torch.einsum("bthp,bsp->bhts", q_pe, k_pe)
        scores = scores.float() * self.scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T).unsqueeze(0)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        p = scores.softmax(-1).to(c.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", p, c)  # [B, T, H, R]
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)  # [B, T, H, v]
