"""Formats: bytes equal llama.cpp's and mlx's, dequantizers equal gguf's, round-trip errors within bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kimiq.quant import FORMATS, get_format
from kimiq.quant.dequant import BLOCK

from .ggml_oracle import oracle

GGUF = list(BLOCK)  # q8_0 q4_0 mxfp4 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k
WEIGHTED = ["q4_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]  # formats whose bytes depend on an imatrix
DEFAULT = Path(__file__).resolve().parents[2] / "kimiq" / "assets" / "default" / "model.safetensors"


def _inputs(seed: int) -> list[np.ndarray]:
    """Distributions that reach the corner cases: zero blocks, one-signed blocks, exact ties, tiny/huge scales."""
    rng = np.random.default_rng(seed)
    gauss = (rng.standard_normal((24, 512)) * rng.uniform(1e-3, 3, (24, 1))).astype(np.float32)
    gauss[0, :256] = 0
    gauss[1, :300] = 0.5
    gauss[2] = np.abs(gauss[2])
    gauss[3] = -np.abs(gauss[3])
    gauss[4, ::7] = 0
    bf16 = torch.from_numpy(rng.standard_normal((16, 512)).astype(np.float32)).bfloat16().float().numpy()
    heavy = (rng.standard_t(2, (16, 512)) * 1e-3).astype(np.float32)
    grid = (rng.integers(-20, 20, (16, 512)) / 16).astype(np.float32)  # many exact rounding ties
    tiny = (rng.uniform(-1, 1, (8, 512)) * 1e-6).astype(np.float32)
    return [gauss, bf16, heavy, grid, tiny]


def _default_weights(n: int = 6) -> list[np.ndarray]:
    with safe_open(str(DEFAULT), "pt") as f:
        names = [k for k in f.keys() if k.endswith("proj.weight") and f.get_slice(k).get_shape()[1] % 256 == 0]
        return [f.get_tensor(k).float().numpy() for k in names[:: max(1, len(names) // n)][:n]]


def _bad_blocks(a: np.ndarray, b: np.ndarray, name: str) -> int:
    nbytes = BLOCK[name][1]
    return int((a != b).reshape(a.shape[0], -1, nbytes).any(axis=2).sum())


# ----------------------------------------------------------------------------- llama.cpp bit-exactness


@pytest.fixture(scope="module")
def ggml():
    o = oracle()
    if o is None:
        pytest.skip("llama.cpp's quantizers unavailable (no llama_cpp, no gcc or no cached/downloadable sdist)")
    return o


@pytest.mark.parametrize("name", GGUF)
def test_bytes_equal_llama_cpp(ggml, name):
    fmt = get_format(name)
    xs = _inputs(0) + _default_weights()
    for x in xs:
        ours = fmt.quantize(torch.from_numpy(x))["weight"].numpy()
        ref = ggml.quantize(name, x)
        assert ours.shape == ref.shape
        assert _bad_blocks(ours, ref, name) == 0, f"{name}: blocks differ from {ggml.origin}"


@pytest.mark.parametrize("name", WEIGHTED)
def test_imatrix_bytes_equal_llama_cpp(ggml, name):
    fmt = get_format(name)
    rng = np.random.default_rng(1)
    for x in _inputs(2)[:4] + _default_weights(3):
        for qw in (rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32), np.ones(x.shape[1], np.float32)):
            ours = fmt.quantize(torch.from_numpy(x), imatrix=qw)["weight"].numpy()
            assert _bad_blocks(ours, ggml.quantize(name, x, qw), name) == 0, f"{name} with imatrix"
        # an all-ones imatrix already takes llama.cpp's other search: the bytes must differ from no-imatrix
    x = _inputs(3)[0]
    assert not np.array_equal(fmt.quantize(torch.from_numpy(x), np.ones(x.shape[1], np.float32))["weight"].numpy(),
                              fmt.quantize(torch.from_numpy(x))["weight"].numpy())


def test_formats_without_imatrix_ignore_it():
    x = torch.from_numpy(_inputs(4)[0])
    qw = np.random.default_rng(0).gamma(0.5, 1.0, x.shape[1]).astype(np.float32)
    for name in ("q8_0", "mxfp4"):
        fmt = get_format(name)
        assert torch.equal(fmt.quantize(x, qw)["weight"], fmt.quantize(x)["weight"])


# ----------------------------------------------------------------------------- gguf package (no network)


@pytest.mark.parametrize("name", GGUF)
def test_against_gguf_package(name):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T

    qtype = getattr(T, name.upper())
    fmt = get_format(name)
    for x in _inputs(5):
        packed = fmt.quantize(torch.from_numpy(x))["weight"]
        # dequantize: ours (torch) == gguf's numpy reference, exactly
        np.testing.assert_array_equal(fmt.dequantize({"weight": packed}, x.shape).numpy(),
                                      gq.dequantize(packed.numpy(), qtype))
        if name in ("q8_0", "q4_0", "q5_0", "q5_1", "mxfp4"):  # the ones gguf-py can quantize
            np.testing.assert_array_equal(packed.numpy(), gq.quantize(x, qtype))


# ----------------------------------------------------------------------------- mlx bit-exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_affine_and_mxfp4_equal_mlx(dtype):
    mx = pytest.importorskip("mlx.core")
    mdt = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}[dtype]
    rng = np.random.default_rng(6)
    x = torch.from_numpy((rng.standard_normal((16, 256)) * 0.05).astype(np.float32)).to(dtype)
    x[0, :128] = 0
    x[1, :128] = -x[1, :128].abs()
    x[2, :128] = 1.0
    xm = mx.array(x.float().numpy()).astype(mdt)

    def mnp(a, as_f32=False):
        return np.array(a.astype(mx.float32)) if as_f32 else np.array(a)

    for name, fmt in FORMATS.items():
        if not name.startswith("affine"):
            continue
        p = fmt.quantize(x)
        bits, group = int(name[6]), int(name.split("-g")[1])
        codes, scales, biases = mx.quantize(xm, group_size=group, bits=bits)
        np.testing.assert_array_equal(p["weight"].numpy(), mnp(codes).view(np.int32), err_msg=name)
        np.testing.assert_array_equal(p["scales"].float().numpy(), mnp(scales, True), err_msg=name)
        np.testing.assert_array_equal(p["biases"].float().numpy(), mnp(biases, True), err_msg=name)
        ref = mnp(mx.dequantize(codes, scales, biases, group_size=group, bits=bits), True)
        np.testing.assert_allclose(fmt.dequantize(p, tuple(x.shape)).numpy(), ref, rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 1e-2, err_msg=name)
    y = torch.from_numpy(rng.standard_normal((16, 256)).astype(np.float32)).to(dtype)
    p = get_format("mxfp4-mlx").quantize(y)
    codes, scales = mx.quantize(mx.array(y.float().numpy()).astype(mdt), mode="mxfp4", group_size=32, bits=4)[:2]
    np.testing.assert_array_equal(p["weight"].numpy(), mnp(codes).view(np.int32))
    np.testing.assert_array_equal(p["scales"].numpy(), mnp(scales))
    ref = mnp(mx.dequantize(codes, scales, mode="mxfp4", group_size=32, bits=4), True)
    np.testing.assert_array_equal(get_format("mxfp4-mlx").dequantize(p, tuple(y.shape)).numpy(), ref)


# ----------------------------------------------------------------------------- round-trip error bounds

# Relative RMS error ||W - deq(q(W))|| / ||W|| per row: upper bounds for Gaussian rows and for the
# default model's trained weights.  Measured maxima (2026-11-30) are about 0.9x of each bound; the
# default model's heavier tails cost ~10% over Gaussian rows.
REL_RMSE_BOUND = {
    "f32": 0.0, "f16": 3e-4, "bf16": 2.2e-3,
    "q8_0": 0.0075, "q4_0": 0.115, "q5_0": 0.058, "q5_1": 0.05, "mxfp4": 0.15, "mxfp4-mlx": 0.16,
    "q2_k": 0.39, "q3_k": 0.19, "q4_k": 0.095, "q5_k": 0.047, "q6_k": 0.023,
    "affine2-g32": 0.46, "affine2-g64": 0.55, "affine2-g128": 0.63,
    "affine3-g32": 0.23, "affine3-g64": 0.26, "affine3-g128": 0.30,
    "affine4-g32": 0.11, "affine4-g64": 0.125, "affine4-g128": 0.145,
    "affine5-g32": 0.051, "affine5-g64": 0.06, "affine5-g128": 0.069,
    "affine6-g32": 0.025, "affine6-g64": 0.029, "affine6-g128": 0.034,
    "affine8-g32": 0.0063, "affine8-g64": 0.0074, "affine8-g128": 0.0084,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_error_bound(name):
    fmt = get_format(name)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((32, 512)).astype(np.float32)] + _default_weights(4)
    for x in xs:
        w = torch.from_numpy(x)
        parts = fmt.quantize(w)
        back = fmt.dequantize(parts, tuple(w.shape))
        rel = ((back - w).pow(2).mean(1) / w.pow(2).mean(1)).sqrt()
        assert float(rel.max()) <= REL_RMSE_BOUND[name], f"{name}: rel RMSE {float(rel.max()):.4f}"
    # stored size = bits per weight (mlx scales/biases take the weight dtype: bf16 as in checkpoints)
    parts = fmt.quantize(torch.from_numpy(xs[0]).bfloat16())
    nbytes = sum(p.numel() * p.element_size() for p in parts.values())
    assert nbytes == fmt.nbytes(xs[0].shape), f"{name}: stored {nbytes} B, bpw says {fmt.nbytes(xs[0].shape)}"


def test_elementwise_bounds():
    """Q8_0: |err| <= d/2 (+ f16 rounding of d) per block; affine: see below."""
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((8, 256)).astype(np.float32))
    p = get_format("q8_0").quantize(x)["weight"]
    d = p.view(-1, 34)[:, :2].contiguous().view(torch.float16).float().view(8, -1)  # [rows, blocks]
    err = (get_format("q8_0").dequantize({"weight": p}, (8, 256)) - x).abs().view(8, -1, 32)
    amax = x.abs().view(8, -1, 32).amax(-1)
    assert bool((err.amax(-1) <= d / 2 + amax * 2**-11).all())
    # mlx's zero-aligned affine rounds edge/s to an integer q0 and rescales, so the codes can cover
    # less than [wmin, wmax]: the far end is clipped by at most range - n*|s| (up to about one step).
    fmt = get_format("affine4-g64")
    q = fmt.quantize(x)
    err = (fmt.dequantize(q, (8, 256)) - x).abs().view(8, -1, 64).amax(-1)
    g = x.view(8, -1, 64)
    shortfall = (g.amax(-1) - g.amin(-1)) - 15 * q["scales"].abs()
    assert bool((err <= torch.maximum(q["scales"].abs() / 2, shortfall) + 1e-6).all())
    assert bool((err > q["scales"].abs() / 2 + 1e-6).any())  # the clipping is real (mlx does the same)


def test_imatrix_lowers_weighted_error():
    """With importance on a few columns, their error drops: the point of the imatrix."""
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.standard_normal((64, 512)).astype(np.float32))
    qw = np.full(512, 0.01, np.float32)
    qw[rng.choice(512, 64, replace=False)] = 10.0
    for name in WEIGHTED:
        fmt = get_format(name)
        err_plain = (fmt.dequantize(fmt.quantize(x), (64, 512)) - x).pow(2).numpy() @ qw
        err_w = (fmt.dequantize(fmt.quantize(x, qw), (64, 512)) - x).pow(2).numpy() @ qw
        assert err_w.sum() < 0.9 * err_plain.sum(), name


def test_registry_contract():
    assert get_format("Q4_K").name == "q4_k"
    assert {n: get_format(n).bits_per_weight for n in ("q4_k", "q6_k", "q8_0", "mxfp4", "affine4-g64")} == {
        "q4_k": 4.5, "q6_k": 6.5625, "q8_0": 8.5, "mxfp4": 4.25, "affine4-g64": 4.5}
    with pytest.raises(KeyError, match="unknown format"):
        get_format("q4_z")
    with pytest.raises(ValueError, match="multiple of 256"):
        get_format("q4_k").quantize(torch.zeros(4, 64))
    with pytest.raises(ValueError, match="imatrix has shape"):
        get_format("q4_k").quantize(torch.zeros(4, 256), imatrix=np.ones(3, np.float32))
    assert get_format("q4_k").supports((8, 512)) and not get_format("q4_k").supports((8, 64))
