"""KDA recurrence: chunked == recurrent == plain per-token loop (fp32, to 1e-5)."""

import pytest
import torch
import torch.nn.functional as F

from kimiq.ops.kda import chunk_kda, kda, naive_recurrent_kda, recurrent_kda


def per_token_loop(q, k, v, g, beta, scale, S0):
    """The textbook recurrence, one head and one row at a time, no batching tricks."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    S_all = torch.zeros(B, H, K, V, dtype=torch.float64) if S0 is None else S0.double().clone()
    for b in range(B):
        for h in range(H):
            S = S_all[b, h]
            for t in range(T):
                S = torch.diag(g[b, t, h].double().exp()) @ S
                kt, vt = k[b, t, h].double(), v[b, t, h].double()
                S = S + beta[b, t, h].double() * torch.outer(kt, vt - S.T @ kt)
                o[b, t, h] = S.T @ (q[b, t, h].double() * scale)
            S_all[b, h] = S
    return o, S_all


def make_inputs(B, T, H, K, V, seed, gate_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    # per-head gate magnitudes from "never forgets" to "forgets at once" (unbounded gate)
    mags = torch.logspace(-3, 1.5, H).view(1, 1, H, 1) * gate_scale
    g = -torch.rand(B, T, H, K, generator=gen) * mags
    beta = torch.rand(B, T, H, generator=gen)
    S0 = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("T", [1, 7, 64, 100, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["S0=0", "S0=rand"])
def test_chunk_recurrent_loop_agree(T, with_state):
    B, H, K, V = 2, 3, 16, 12
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, seed=T)
    S0 = S0 if with_state else None
    scale = K**-0.5
    o_ref, S_ref = per_token_loop(q, k, v, g, beta, scale, S0)
    for fn in (naive_recurrent_kda, recurrent_kda, chunk_kda):
        o, S = fn(q, k, v, g, beta, scale=scale, initial_state=S0, output_final_state=True)
        assert o.dtype == torch.float32 and S.dtype == torch.float32
        torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=0, msg=f"{fn.__name__} output")
        torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=0, msg=f"{fn.__name__} state")


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes_and_split_prefill(chunk_size):
    """Chunk size is irrelevant, and prefill split in two calls equals one call."""
    B, T, H, K, V = 1, 90, 2, 8, 8
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, seed=1)
    o_ref, S_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    o, S = chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
    a = slice(0, 37)
    b = slice(37, T)
    o1, S1 = chunk_kda(q[:, a], k[:, a], v[:, a], g[:, a], beta[:, a], initial_state=S0, output_final_state=True)
    o2, S2 = chunk_kda(q[:, b], k[:, b], v[:, b], g[:, b], beta[:, b], initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(S2, S_ref, atol=1e-5, rtol=0)


def test_strong_decay_no_overflow():
    """Unbounded gate: cumulative log-decay of thousands must not overflow the chunk form."""
    q, k, v, g, beta, S0 = make_inputs(1, 128, 2, 8, 8, seed=2, gate_scale=100.0)
    o_ref, S_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    o, S = chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)


def test_neutral_steps_leave_state_unchanged():
    q, k, v, g, beta, S0 = make_inputs(1, 10, 2, 8, 8, seed=3)
    _, S = chunk_kda(q, k, v, torch.zeros_like(g), torch.zeros_like(beta), initial_state=S0, output_final_state=True)
    torch.testing.assert_close(S, S0, atol=0, rtol=0)


def test_state_must_be_fp32_and_impl_explicit():
    q, k, v, g, beta, S0 = make_inputs(1, 4, 1, 8, 8, seed=4)
    with pytest.raises(TypeError, match="fp32"):
        chunk_kda(q, k, v, g, beta, initial_state=S0.bfloat16())
    with pytest.raises(ValueError, match="unknown KDA impl"):
        kda(q, k, v, g, beta, impl="triton-magic")


def test_bf16_inputs_keep_fp32_state():
    """Long recurrence with bf16 q/k/v stays close to the fp32 run because state and decay are fp32."""
    q, k, v, g, beta, S0 = make_inputs(1, 512, 2, 16, 16, seed=5, gate_scale=0.01)
    o32, S32 = chunk_kda(q, k, v, g, beta, output_final_state=True)
    o16, S16 = chunk_kda(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    rel = (S16 - S32).norm() / S32.norm()
    assert rel < 2e-2, rel


def test_compiled_chunk_step_matches_eager():
    """impl="compile" (the training default: torch.compile of one chunk step) == the eager chunked form,
    forward and backward (fp32, 1e-5).  Compiling takes ~10-20 s on 2 cores: one small shape only."""
    B, T, H, K, V = 2, 48, 2, 16, 16
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, seed=11)
    outs, grads = [], []
    for impl in ("torch", "compile"):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
        o, S = kda(*ins, scale=K**-0.5, initial_state=S0, output_final_state=True, impl=impl)
        (o.square().sum() + S.sum()).backward()
        outs.append((o.detach(), S.detach()))
        grads.append([t.grad for t in ins])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
