"""The C++ operators (kimiq/ops/qops.py) against the eager quantized modules they stand in for in compiled graphs.

Same kernels as ``kimiq.ops.qmatmul``, so fp32 agrees to the last bits but for silu's exp; bf16 rounds where the
eager modules round.  Tolerances relative to max |eager output|.
"""

import shutil

import pytest
import torch

from kimiq.ops import qmatmul, qops
from kimiq.quant.formats import get_format
from kimiq.quant.modules import QuantEmbedding, QuantExperts, QuantLinear

TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: no operators to test (compiled graphs use Python ops)")


def test_builds():
    assert qops.available(), qops._State.error
    assert qops.loaded()


def _parts(fmt: str, N: int, K: int, seed: int):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return get_format(fmt).quantize(w)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("fmt", qmatmul.GGUF_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_matches_the_module(fmt, dtype, monkeypatch):
    assert qops.available()
    N, K = 40, 512
    lin = QuantLinear(fmt, K, N, _parts(fmt, N, K, 1), dtype)
    lin._int4 = False  # eager path: the fused kernel (4-bit formats would take torch's int4 op)
    for shape in ((1, 1, K), (3, K), (2, 19, K)):  # 38 rows: more than one kernel call
        x = torch.randn(*shape).to(dtype)
        got = torch.ops.kimiq_cpu.qlinear(x, lin.q_weight, qops.FORMAT_ID[fmt], N)
        lin.use_fast = shape[-2] <= qmatmul.MAX_ROWS  # the module's reference path for prefill-sized inputs
        with monkeypatch.context() as m:
            m.setattr(qops._State, "loaded", False)  # the module's own path (ctypes kernels), not this operator
            want = lin.eager_forward(x)
        _close(got, want, dtype if lin.use_fast else torch.bfloat16)


@pytest.mark.parametrize("fmts", [("q6_k", "q6_k", "q8_0"), ("mxfp4", "mxfp4", "mxfp4"), ("q5_0", "q5_1", "q3_k")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qexperts_matches_the_module(fmts, dtype):
    assert qops.available()
    E, D, I, k = 5, 256, 512, 2
    names = ("w1", "w3", "w2")
    shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
    parts = {}
    for p, fmt in zip(names, fmts):
        per = [_parts(fmt, *shapes[p], seed=10 * E + e) for e in range(E)]
        parts[p] = {key: torch.stack([q[key] for q in per]) for key in per[0]}
    exp = QuantExperts(dict(zip(names, fmts)), shapes, parts, E, dtype)
    gen = torch.Generator().manual_seed(0)
    for T in (1, 3):
        x = torch.randn(T, D, generator=gen).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=gen)
        got = torch.ops.kimiq_cpu.qexperts(x, w, idx, exp.w1_weight, exp.w3_weight, exp.w2_weight,
                                           *[qops.FORMAT_ID[f] for f in fmts])
        _close(got, exp.eager_forward(x, w, idx), dtype)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0", "q2_k", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qrows_matches_the_module(fmt, dtype):
    assert qops.available()
    V, D = 50, 256
    emb = QuantEmbedding(fmt, V, D, _parts(fmt, V, D, 2), dtype)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    got = torch.ops.kimiq_cpu.qrows(emb.q_weight, ids, qops.FORMAT_ID[fmt], D, dtype == torch.bfloat16)
    assert torch.equal(got, emb.eager_forward(ids))  # a dequantized value, no sums: equal


def test_bad_input_is_refused_with_a_reason():
    assert qops.available()
    lin = QuantLinear("q8_0", 64, 8, _parts("q8_0", 8, 64, 3))
    with pytest.raises(RuntimeError, match="unknown format"):
        torch.ops.kimiq_cpu.qlinear(torch.randn(1, 64), lin.q_weight, 99, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.kimiq_cpu.qlinear(torch.randn(1, 64).half(), lin.q_weight, 0, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.kimiq_cpu.qrows(lin.q_weight, torch.tensor([8]), 0, 64, False)
    w = torch.zeros(2, 64, 34, dtype=torch.uint8)  # Q8_0 rows of 64 weights, but Q4_K needs 256 per block
    with pytest.raises(RuntimeError, match="whole number of blocks"):
        torch.ops.kimiq_cpu.qexperts(torch.randn(1, 64), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), w, w,
                                     w, qops.FORMAT_ID["q4_k"], qops.FORMAT_ID["q4_k"], qops.FORMAT_ID["q4_k"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_step_is_the_recurrence_in_place(dtype, monkeypatch):
    """kimiq_cpu::kda_step (through kda_decode_) == the naive per-token recurrence, and so is kda_decode_'s fallback
    (recurrent_kda) when the operators are not loaded; the state is updated in place, fp32."""
    from kimiq.ops.kda import kda_decode_, naive_recurrent_kda
    from tests.ops.test_kda import make_inputs

    assert qops.available()
    q, k, v, g, beta, S0 = make_inputs(3, 1, 4, 128, 64, seed=5)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o_ref, S_ref = naive_recurrent_kda(q, k, v, g, beta, 128**-0.5, S0, True)
    for loaded in (True, False):
        monkeypatch.setattr(qops._State, "loaded", loaded)
        S = S0.clone()
        o = kda_decode_(S, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], 128**-0.5)
        assert o.dtype == dtype and S.dtype == torch.float32
        torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(o.float(), o_ref[:, 0].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("D,Dv", [(96, 64), (56, 56), (288, 256), (40, 17)])  # masked last chunks: 56, 40, 17
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_is_softmax_attention_over_the_cache(cache_dtype, D, Dv):
    """kimiq_cpu::mla_decode (one pass, online softmax, rows split over threads) == softmax(scale q.c) . c[:Dv] over
    the cached rows j < lengths[b] and the new row, as KimiMLAAttention.decode's einsums compute it.  A bf16 cache
    may use bf16 dot products (q and the weights rounded to bf16): tolerance 2e-3 there, 1e-5 in fp32."""
    assert qops.available()
    gen = torch.Generator().manual_seed(3)
    B, H, L = 2, 5, 700  # 5 heads: a group of 4 and one alone; 700 rows: several blocks and thread parts
    q, past = torch.randn(B, H, D, generator=gen), torch.randn(B, L, D, generator=gen)
    new = torch.randn(B, D, generator=gen)
    lengths = torch.tensor([L, 333])  # 333: odd, a last block of 13 rows
    past = past.to(cache_dtype)
    c = past.float()
    scores = torch.cat([torch.einsum("bhd,bld->bhl", q, c).masked_fill(
        (torch.arange(L) >= lengths[:, None])[:, None], float("-inf")), (q * new[:, None]).sum(-1, keepdim=True)], -1)
    p = (scores * 0.1).softmax(-1)
    want = torch.einsum("bhl,bld->bhd", p[..., :L], c[..., :Dv]) + p[..., L:] * new[:, None, :Dv]
    tol = 1e-5 if cache_dtype == torch.float32 else 2e-3  # bf16 dot products: measured max error 2.2e-4
    for threads in (None, 1, 2):  # the thread split changes the summation order only
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            got = torch.ops.kimiq_cpu.mla_decode(q, past, new, lengths, 0.1, Dv)
            assert got.shape == (B, H, Dv)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        finally:
            torch.set_num_threads(old)


def test_mla_decode_sharp_softmax_underflows_to_zero_weights():
    """Scores hundreds apart (weights like exp(-300): 0, not NaN, in the operator's own exp) still give softmax
    attention."""
    assert qops.available()
    gen = torch.Generator().manual_seed(4)
    q, past, new = torch.randn(1, 4, 96, generator=gen), torch.randn(1, 300, 96, generator=gen), torch.randn(1, 96)
    scale = 8.0
    scores = torch.cat([torch.einsum("bhd,bld->bhl", q, past), (q * new[:, None]).sum(-1, keepdim=True)], -1)
    assert float(scores.max() - scores.min()) * scale > 300
    p = (scores * scale).softmax(-1)
    want = torch.einsum("bhl,bld->bhd", p[..., :300], past) + p[..., 300:] * new[:, None]
    got = torch.ops.kimiq_cpu.mla_decode(q, past, new, torch.tensor([300]), scale, 96)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
