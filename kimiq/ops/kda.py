"""Kimi Delta Attention core: the gated delta-rule recurrence, in three same-signature forms.

All functions take already L2-normalised q and k (the caller normalises; fla's naive ops do
the same) and return ``(o, final_state)``::

    q, k:   [B, T, H, K]          v: [B, T, H, V]
    g:      [B, T, H, K]  log-decay per step and key channel (<= 0), fp32
    beta:   [B, T, H]     in (0, 1), fp32
    state:  [B, H, K, V]  K-first layout, always fp32
    o:      [B, T, H, V]  in v's dtype

Recurrence per head (``kimi-linear-architecture.md`` §3.4)::

    S' = diag(exp(g_t)) S_{t-1}
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
    o_t = scale * S_t^T q_t

* ``naive_recurrent_kda`` — the per-token loop, the oracle (fla ``naive_recurrent_kda``).
* ``chunk_kda`` — the chunked parallel (WY / UT-transform) form for prefill, pure torch,
  any T (padded internally with neutral steps g=0, beta=0, k=0).
* ``recurrent_kda`` — the decode form: the same loop without the per-step Python overhead
  that matters for T <= a few tokens.
* ``kda_decode_`` — one token in place on the state: the fused C++ operator where loaded (CPU), else
  ``recurrent_kda``.

A step with beta=0 and g=0 leaves the state unchanged; the model uses this to skip padded
positions of shorter rows in a batch.

Fast kernels (fla's Triton ``chunk_kda`` / ``fused_recurrent_kda``) are reached through
``kda(..., impl="fla")`` and must match these references; choose the implementation
explicitly, never by import side effects.
"""

from __future__ import annotations

import functools

import torch

from kimiq.ops import qops

__all__ = ["naive_recurrent_kda", "recurrent_kda", "chunk_kda", "kda", "kda_decode_", "IMPLS"]

IMPLS = ("torch", "compile", "naive", "fla")


def _prep(q, k, v, g, beta, scale, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        if initial_state.dtype != torch.float32:
            raise TypeError(f"KDA recurrent state must be fp32, got {initial_state.dtype}")
        S = initial_state.clone()
    return q.float(), k.float(), v.float(), g.float(), beta.float(), scale, S


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Per-token reference loop in fp32.  Shapes in the module docstring."""
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prep(q, k, v, g, beta, scale, initial_state)
    T = q.shape[1]
    o = torch.empty_like(v)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)  # [B, H, K, V] decay key rows
        k_t = k[:, t]  # [B, H, K]
        pred = torch.einsum("bhk,bhkv->bhv", k_t, S)
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)  # [B, H, V]
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return o.to(out_dtype), (S if output_final_state else None)


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Decode form: same math as ``naive_recurrent_kda``, written for small T (1-4 tokens).

    Uses ``baddbmm``-style batched products on [B*H] so one step is a handful of kernels.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prep(q, k, v, g, beta, scale, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = S.view(B * H, K, V)
    qs = (q * scale).transpose(1, 2).reshape(B * H, T, K)
    ks = k.transpose(1, 2).reshape(B * H, T, K)
    vs = v.transpose(1, 2).reshape(B * H, T, V)
    decay = g.exp().transpose(1, 2).reshape(B * H, T, K)
    bs = beta.transpose(1, 2).reshape(B * H, T, 1)
    o = torch.empty(B * H, T, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        S = S * decay[:, t, :, None]
        k_t = ks[:, t : t + 1]  # [BH, 1, K]
        delta = bs[:, t : t + 1] * (vs[:, t : t + 1] - torch.bmm(k_t, S))  # [BH, 1, V]
        S = torch.baddbmm(S, k_t.transpose(1, 2), delta)  # S + k^T delta
        o[:, t : t + 1] = torch.bmm(qs[:, t : t + 1], S)
    o = o.view(B, H, T, V).transpose(1, 2)
    return o.to(out_dtype), (S.view(B, H, K, V) if output_final_state else None)


def _chunk_step(qc, kc, vc, Gc, bc, S):
    """One chunk of ``chunk_kda``: qc/kc [B, H, C, K] (qc scaled), vc [B, H, C, V], Gc [B, H, C, K] inclusive
    cumulative log-decay within the chunk, bc [B, H, C], S [B, H, K, V] -> (o [B, H, C, V], S at chunk end)."""
    C = qc.shape[-2]
    strict = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    eye = torch.eye(C, dtype=torch.float32, device=qc.device)
    V = vc.shape[-1]
    # pairwise decays exp(G_t - G_j) for j <= t, zero elsewhere: [B, H, C, C, K]
    diff = Gc.unsqueeze(-2) - Gc.unsqueeze(-3)
    decay = torch.where(causal[..., None], diff, diff.new_tensor(float("-inf"))).exp()
    kj = decay * kc.unsqueeze(-3)  # [B, H, C(t), C(j), K]: k_j[d] exp(G_t[d] - G_j[d])
    scores = kj @ torch.stack((kc, qc), dim=-1)  # [B, H, C(t), C(j), 2]: k_t. and q_t. in one pass
    A = scores[..., 0] * strict * bc.unsqueeze(-1)
    rhs = torch.cat([vc, Gc.exp() * kc], dim=-1) * bc.unsqueeze(-1)  # [B, H, C, V + K]
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U, W = sol[..., :V], sol[..., V:]
    D = U - W @ S  # [B, H, C, V]
    qk = scores[..., 1]  # causal incl. diagonal (decay is 0 above it)
    o = (Gc.exp() * qc) @ S + qk @ D
    G_last = Gc[:, :, -1:, :]  # [B, H, 1, K]
    S = G_last.squeeze(-2).exp().unsqueeze(-1) * S + ((G_last - Gc).exp() * kc).transpose(-1, -2) @ D
    return o, S


@functools.cache
def _compiled_chunk_step():
    """``torch.compile(_chunk_step)`` (inductor), built on first use, never at import."""
    return torch.compile(_chunk_step, dynamic=False)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=16,
              compiled=False):
    """Chunked parallel form (prefill).  Exact in exact arithmetic; fp32 throughout.

    ``chunk_size=16``: the [B, H, C, C, K] pairwise-decay block stays in cache; on 2 CPU cores 16 was
    1.4x faster than 64 for prefill and 6x for training (fwd+bwd), measured 2026-11-22.

    Within a chunk of C steps with inclusive cumulative log-decay G = cumsum(g):

        A[t, j]  = beta_t * sum_d k_t[d] k_j[d] exp(G_t[d] - G_j[d])        (j < t)
        (I + A) D = diag(beta) (V - (exp(G) * K) S0)      -> D = U - W S0   (the "new values")
        o_t      = (exp(G_t) * q_t)^T S0 + sum_{j<=t} (q_t . k_j exp(G_t - G_j)) D_j
        S_C      = diag(exp(G_C)) S0 + sum_j diag(exp(G_C - G_j)) k_j D_j^T

    Every exponent is a difference G_t - G_j with t >= j, so it is <= 0 and never overflows
    even for the unbounded Kimi-Linear gate.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prep(q, k, v, g, beta, scale, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    n = (T + C - 1) // C
    pad = n * C - T
    if pad:  # neutral steps: no decay, no update
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
        beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))
    # [B, T, H, X] -> [B, H, n, C, X]
    q, k, v, g = (x.transpose(1, 2).reshape(B, H, n, C, -1) for x in (q, k, v, g))
    beta = beta.transpose(1, 2).reshape(B, H, n, C)
    q = q * scale

    G = g.cumsum(-2)  # [B, H, n, C, K]
    step = _compiled_chunk_step() if compiled else _chunk_step
    # unbind / stack, not x[:, :, c] and o[:, :, c] = ...: their backward zero-fills a full-size gradient per
    # chunk (quadratic in T); unbind's backward is one stack.
    outs = []
    for qc, kc, vc, Gc, bc in zip(*(x.unbind(2) for x in (q, k, v, G, beta))):
        oc, S = step(qc, kc, vc, Gc, bc, S)
        outs.append(oc)
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)  # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)


def kda_decode_(S, q, k, v, g, beta, scale):
    """One decode step in place: ``S`` [B, H, K, V] fp32 updated, q, k, g [B, H, K], v [B, H, V], beta [B, H];
    returns o [B, H, V] in v's dtype.  On CPU with kimiq's C++ operators loaded (``kimiq.ops.qops``; never built
    here) the fused ``kimiq_cpu::kda_step`` (two passes over each head's state, the second from cache; the
    ``recurrent_kda`` graph reads and writes it four or five times), else ``recurrent_kda`` and a copy back."""
    if S.device.type == "cpu" and qops.loaded():
        return torch.ops.kimiq_cpu.kda_step(S, q, k, v, g, beta, scale).to(v.dtype)
    o, S_new = recurrent_kda(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale, S, True)
    S.copy_(S_new)
    return o[:, 0]


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, *, impl="torch"):
    """Dispatch by explicit ``impl``: "torch" (chunk for T > 4, else recurrent), "compile" (the same with the
    chunk step compiled by inductor: ~2x for training, ~20 s to compile once per shape), "naive", "fla"."""
    T = q.shape[1]
    if impl == "naive":
        return naive_recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state)
    if impl in ("torch", "compile"):
        if T <= 4:
            return recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state)
        return chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, compiled=impl == "compile")
    if impl == "fla":
        from kimiq.ops.kda_fla import fla_kda  # imported only when asked for

        return fla_kda(q, k, v, g, beta, scale, initial_state, output_final_state)
    raise ValueError(f"unknown KDA impl {impl!r}; choose one of {IMPLS}")
