"""GGUF block formats with 32-element blocks: Q8_0, Q4_0 and MXFP4 (ggml layouts, ggml rounding).

Quantizers are numpy re-statements of ggml's ``quantize_row_*_ref`` (``ggml/src/ggml-quants.c``)
that produce the same bytes: every float operation is done in float32 in the C order, with the
C rounding (``roundf`` = half away from zero, ``(int8_t)`` = truncation, ``nearest_int`` = half to
even).  A quantizer takes ``x: float32 [rows, K]`` (K a multiple of 32) and returns the packed
blocks ``uint8 [rows, K/32 * bytes_per_block]``, i.e. exactly the bytes of a GGUF tensor row.
Dequantizers are torch (``kimiq.quant.dequant``) so they run wherever the model runs.

Block layouts (``ggml-common.h``), element ``j`` of a 32-block:

* Q8_0  (34 B): ``f16 d | int8 qs[32]``;                        ``y = qs[j] * d``
* Q4_0  (18 B): ``f16 d | u8 qs[16]`` low nibble j, high j+16;  ``y = (nibble - 8) * d``
* MXFP4 (17 B): ``u8 e  | u8 qs[16]`` low nibble j, high j+16;  ``y = KVALUES_MXFP4[nibble] * 2^(e-128)``
* Q5_0  (22 B): ``f16 d | u8 qh[4] | u8 qs[16]``, 5th bit of element j = bit j of qh; ``y = (q - 16) * d``
* Q5_1  (24 B): ``f16 d, m | u8 qh[4] | u8 qs[16]``;              ``y = q * d + m``

Q5_0 / Q5_1 are llama.cpp's fallbacks for k-quants on rows whose width is not a multiple of 256.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "KVALUES_MXFP4",
    "quantize_q8_0",
    "quantize_q4_0",
    "quantize_mxfp4",
    "quantize_q5_0",
    "quantize_q5_1",
    "mxfp4_exponent",
    "pack_halves",
]

F32 = np.float32
QK = 32

# E2M1 values doubled (ggml stores them as int8; the half scale 2^(e-128) undoes the doubling).
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


def _blocks(x: np.ndarray, qk: int) -> np.ndarray:
    """[rows, K] float -> [rows * K/qk, qk] float32 (C-contiguous copy)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] % qk:
        raise ValueError(f"expected a [rows, K] array with K a multiple of {qk}, got shape {tuple(x.shape)}")
    return x.reshape(-1, qk)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 [N] -> [N, 2] uint8, IEEE half little-endian (round to nearest even, as GGML_FP32_TO_FP16)."""
    return d.astype(np.float16).astype("<f2").view(np.uint8).reshape(-1, 2)


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (``v - trunc(v)`` is exact in float)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0).astype(v.dtype)


def pack_halves(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [N, 32] -> [N, 16] bytes: low nibble = element j, high nibble = element j + 16."""
    codes = codes.astype(np.uint8)
    return codes[:, :16] | (codes[:, 16:] << 4)


def _abs_argmax_signed(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's running ``if (amax < fabsf(v)) {amax = fabsf(v); max = v;}``: the first element of largest |v|."""
    a = np.abs(b)
    idx = np.argmax(a, axis=1)  # first occurrence of the maximum, like the strict '<' update
    amax = a[np.arange(len(b)), idx]
    return amax, b[np.arange(len(b)), idx]


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0: ``d = amax / 127`` (fp32), ``q = roundf(x * (1/d))``; 34 bytes per 32 weights."""
    b = _blocks(x, QK)
    rows = x.shape[0]
    amax = np.abs(b).max(axis=1)
    d = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    v = b * inv[:, None]
    q = roundf(v).astype(np.int8)
    out = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)
    return out.reshape(rows, -1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0: ``d = max / -8`` (max = signed value of largest magnitude), ``q = min(15, (int8)(x/d + 8.5))``."""
    b = _blocks(x, QK)
    rows = x.shape[0]
    _, mx = _abs_argmax_signed(b)
    d = (mx / F32(-8)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    v = b * inv[:, None] + F32(8.5)
    q = np.minimum(np.trunc(v), F32(15)).astype(np.uint8)  # (int8_t) truncates toward zero; v >= 0 here
    out = np.concatenate([_f16_bytes(d), pack_halves(q)], axis=1)
    return out.reshape(rows, -1)


def mxfp4_exponent(amax: np.ndarray, rule: str = "ocp") -> np.ndarray:
    """E8M0 block exponent from the block's max |x|.

    ``"ocp"`` (llama.cpp / OCP MX spec): ``floor(log2f(amax)) - 2 + 127``; ``"mlx"`` (mlx >= 0.32.4,
    ml-explore/mlx#4353): ``ceil(log2(amax / 6)) + 127``, which never saturates.  ``amax == 0`` gives 0.
    """
    a = amax.astype(np.float64)
    with np.errstate(divide="ignore"):
        if rule == "ocp":
            # log2f is correctly rounded in float32: emulate by rounding the double result to float32.
            lg = np.log2(a).astype(F32)
            e = np.floor(lg).astype(np.float64) - 2 + 127
        elif rule == "mlx":
            lg = np.log2((amax.astype(F32) / F32(6)).astype(np.float64)).astype(F32)
            e = np.ceil(lg).astype(np.float64) + 127
        else:
            raise ValueError(f"unknown MXFP4 scale rule {rule!r} (expected 'ocp' or 'mlx')")
    e = np.where(amax > 0, np.clip(e, 0, 254), 0)
    return e.astype(np.uint8)


def mxfp4_codes(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Nearest E2M1 code per element: ``argmin_c |KV[c] * 2^(e-128) - x|``, first index on ties (toward zero)."""
    half = np.ldexp(np.ones_like(e, dtype=F32), e.astype(np.int32) - 128).astype(F32)  # [N], exact powers of 2
    cand = KVALUES_MXFP4.astype(F32)[None, None, :] * half[:, None, None]  # [N, 1, 16], exact
    err = np.abs(cand - b[:, :, None])  # [N, 32, 16], float32 like fabsf(kv*e - x)
    return np.argmin(err, axis=2).astype(np.uint8)


def quantize_mxfp4(x: np.ndarray, rule: str = "ocp") -> np.ndarray:
    """MXFP4 in ggml's ``block_mxfp4`` layout (17 bytes per 32 weights)."""
    b = _blocks(x, QK)
    rows = x.shape[0]
    e = mxfp4_exponent(np.abs(b).max(axis=1), rule)
    q = mxfp4_codes(b, e)
    out = np.concatenate([e[:, None], pack_halves(q)], axis=1)
    return out.reshape(rows, -1)


def _pack_q5(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-bit codes [N, 32] -> (qh [N, 4] little-endian uint32 of 5th bits (bit j = element j), qs [N, 16])."""
    codes = codes.astype(np.uint32)
    qh = np.zeros(len(codes), np.uint32)
    for j in range(32):
        qh |= ((codes[:, j] & 0x10) >> 4) << j
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4), pack_halves(codes & 0xF)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """Q5_0 (22 B / 32): ``f16 d | u8 qh[4] | u8 qs[16]``; ``d = max / -16``, ``q = min(31, (int8)(x/d + 16.5))``."""
    b = _blocks(x, QK)
    _, mx = _abs_argmax_signed(b)
    d = (mx / F32(-16)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = np.minimum(np.trunc(b * inv[:, None] + F32(16.5)), F32(31)).astype(np.uint32)
    qh, qs = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1).reshape(x.shape[0], -1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """Q5_1 (24 B / 32): ``f16 d, m | u8 qh[4] | u8 qs[16]``; ``d = (max-min)/31``, ``q = (uint8)((x-min)/d + 0.5)``."""
    b = _blocks(x, QK)
    mn, mx = b.min(axis=1), b.max(axis=1)
    d = ((mx - mn) / F32(31)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = np.trunc((b - mn[:, None]) * inv[:, None] + F32(0.5)).astype(np.uint32)
    qh, qs = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), qh, qs], axis=1).reshape(x.shape[0], -1)
