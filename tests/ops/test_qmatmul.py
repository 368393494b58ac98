"""Fused dequantize-matmul kernels (kimiq/ops/qmatmul.py) against the reference: dequantize, then matmul.

Tolerances by activation dtype, relative to max |reference output|: fp32 only sees a different summation
order; bf16 activations also round the output to bf16.
"""

import shutil

import pytest
import torch

from kimiq.ops import qmatmul, qops
from kimiq.quant.formats import get_format
from kimiq.quant.modules import QuantExperts, QuantLinear

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
FORMATS = [*qmatmul.GGUF_KERNELS, "affine2-g32", "affine3-g64", "affine4-g64", "affine5-g128", "affine6-g32",
           "affine8-g64", "affine4-g128", "mxfp4-mlx"]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernels cannot be built (the reference path runs)")


def test_builds():
    assert qmatmul.available(), qmatmul._Lib.error


def _weights(fmt: str, N: int, K: int, seed: int):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    w[0, :7] *= 30  # an outlier row start: scales must vary
    src = w.to(torch.bfloat16) if fmt.startswith(("affine", "mxfp4-mlx")) else w  # mlx formats keep the dtype
    f = get_format(fmt)
    parts = f.quantize(src)
    return parts, f.dequantize(parts, (N, K))


def _assert_close(fmt: str, y: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, x: torch.Tensor, tol: float):
    """|y - ref| within ``tol`` x max|ref|; kernels that quantize activations to int8 (qmatmul.int8_activations)
    may add up to sum_i |w_i| * max|x| over i's block (32 or 256 values) / 254 per output, and no more."""
    slack = tol * ref.abs().max()
    if blk := qmatmul.int8_activations(fmt):
        amax = x.float().abs().view(x.shape[0], -1, blk).amax(-1).repeat_interleave(blk, dim=-1)  # [M, K]
        slack = slack + 1.0001 * (amax @ w.abs().t()) / 254
    err = (y.float() - ref).abs() - slack
    assert float(err.max()) <= 0, (fmt, float(err.max()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(fmt, dtype):
    N, K = 37, 512
    parts, w_ref = _weights(fmt, N, K, seed=len(fmt))
    prepared = qmatmul.prepare(fmt, parts)
    for M in (1, 3, qmatmul.MAX_ROWS):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        y = qmatmul.qmatmul(fmt, prepared, x, N)
        assert y is not None and y.dtype == dtype and y.shape == (M, N)
        _assert_close(fmt, y, x.float() @ w_ref.t(), w_ref, x, TOL[dtype])


@pytest.mark.parametrize("fmt", sorted(qmatmul.I8_BLOCKS))
def test_int8_activations_are_what_llama_cpp_does_and_no_more(fmt):
    """Where the build has VNNI, Q8_0 / Q4_0 / MXFP4 decode quantizes x to int8 per 32 values, Q4_K / Q6_K per 256
    (llama.cpp's Q8_K): the result equals the exact product with x replaced by its int8 rounding (dx = max|x| / 127
    per block), up to fp32 summation order."""
    blk = qmatmul.int8_activations(fmt)
    if not blk:
        pytest.skip("this build keeps fp32 activations (no AVX512-VNNI)")
    N, K, M = 64, 512, 3
    parts, w_ref = _weights(fmt, N, K, 1)
    x = torch.randn(M, K)
    xb = x.view(M, -1, blk)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(xb / dx) * dx).view(M, K)  # round half to even, as the kernels' conversion
    y = qmatmul.qmatmul(fmt, qmatmul.prepare(fmt, parts), x, N)
    torch.testing.assert_close(y, xq @ w_ref.t(), rtol=0, atol=2e-5 * float(y.abs().max()))


def test_threads_and_rows_limit():
    N, K = 1024, 512  # above the size where the kernel goes parallel
    parts, w_ref = _weights("q6_k", N, K, 0)
    prepared = qmatmul.prepare("q6_k", parts)
    x = torch.randn(2, K)
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(qmatmul.qmatmul("q6_k", prepared, x, N))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])  # rows are independent: threads do not change the sums
    assert qmatmul.qmatmul("q6_k", prepared, torch.randn(qmatmul.MAX_ROWS + 1, K), N) is None  # prefill: reference
    assert qmatmul.prepare("bf16", {"weight": w_ref}) is None


@pytest.mark.parametrize("fmt", ["q6_k", "q8_0", "mxfp4", "affine3-g64"])
def test_modules_fast_equals_reference(fmt, monkeypatch):
    """QuantLinear and QuantExperts take the fused kernel for decode-sized inputs and equal use_fast=False."""
    monkeypatch.setattr(qops._State, "loaded", False)  # these kernels through ctypes (test_qops: the C++ operators)
    N, K, E = 96, 256, 3
    got = [_weights(fmt, N, K, s) for s in range(E)]
    lin = QuantLinear(fmt, K, N, got[0][0])
    x = torch.randn(1, 2, K)
    fast = lin(x)
    assert lin._fused  # the kernel was used
    lin.use_fast = False
    _assert_close(fmt, fast.view(2, N), lin(x).view(2, N), got[0][1], x.view(2, K), TOL[torch.float32])

    stacked = {k: torch.stack([p[k] for p, _ in got]) for k in got[0][0]}  # [E, N, ...]: experts' w2 [N, K]
    exp = QuantExperts({p: fmt for p in ("w1", "w3", "w2")}, {p: (N, K) for p in ("w1", "w3", "w2")},
                       {p: {k: v.clone() for k, v in stacked.items()} for p in ("w1", "w3", "w2")}, E)
    xe = torch.randn(4, K)
    for e in range(E):
        fast = exp._matmul(xe, "w2", e)
        _assert_close(fmt, fast, xe @ got[e][1].t(), got[e][1], xe, TOL[torch.float32])


@pytest.mark.parametrize("fmt", qmatmul.GGUF_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference(fmt, dtype):
    """The C decoders (prefill's dequantize-then-GEMM) give the torch reference's values; experts by index."""
    N, K, E = 24, 512, 3
    got = [_weights(fmt, N, K, seed=s) for s in range(E)]
    stacked = qmatmul.prepare(fmt, {"weight": torch.stack([p["weight"] for p, _ in got])})
    for e in range(E):
        w = qmatmul.dequantize(fmt, stacked, (N, K), dtype, index=e)
        assert w is not None and w.dtype == dtype
        torch.testing.assert_close(w, got[e][1].to(dtype), rtol=1e-6, atol=0)
    assert qmatmul.dequantize("affine4-g64", stacked, (N, K), dtype) is None  # no C decoder: reference path


def test_prefill_sized_inputs_take_the_dense_gemm(monkeypatch):
    N, K = 96, 256
    parts, w_ref = _weights("q4_k", N, K, 0)
    lin = QuantLinear("q4_k", K, N, parts)
    x = torch.randn(qmatmul.GEMM_ROWS, K).bfloat16()

    def no_fused(*a, **k):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(qmatmul, "qmatmul", no_fused)
    y = lin(x)
    assert lin._int4 is None  # not the int4 repack: the C-dequantized matrix and F.linear
    torch.testing.assert_close(y.float(), x.float() @ w_ref.t(), rtol=0, atol=1e-2 * float(y.abs().max()))


def test_cpu_path_by_format_rows_and_dtype():
    """The kernel choice in modules._cpu_path (measured crossovers; see its docstring)."""
    from kimiq.quant.modules import _cpu_path, _fp32_gemm_fast

    bf, f32, k8 = torch.bfloat16, torch.float32, qmatmul.int8_activations("q4_k") == 256
    assert _cpu_path(1, "q6_k", bf) == _cpu_path(qmatmul.MAX_ROWS, "q8_0", f32) == "fused"
    assert _cpu_path(qmatmul.MAX_ROWS + 1, "q8_0", f32) == _cpu_path(qmatmul.GEMM_ROWS, "q4_0", bf) == "dense"
    assert _cpu_path(1, "q4_0", bf) == _cpu_path(1, "affine4-g64", f32) == "int4"
    assert _cpu_path(1, "q4_k", bf) == ("fused" if k8 else "int4")  # Q4_K's VNNI kernel beats torch's int4 one
    # the int8 kernel where the fp32 GEMM is the slower one (MKL on AMD), else the GEMM
    assert _cpu_path(512, "q4_k", f32) == ("fused" if k8 and not _fp32_gemm_fast() else "dense")
    assert _cpu_path(qmatmul.MAX_ROWS, "q4_k", f32) == ("fused" if k8 else "int4")
    assert _cpu_path(512, "q4_k", bf) == "dense"
