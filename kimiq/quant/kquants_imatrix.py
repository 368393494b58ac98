"""Importance-weighted GGUF quantizers: llama.cpp's ``quantize_row_*_impl`` paths (taken with an imatrix).

``qw [K]`` is the importance of each input column (the imatrix: mean squared activation per
column, ``../shared/reference/quantization-formats.md`` §4), shared by every row of the tensor.
Element weights are ``qw[col] * sqrt(sigma2 + x^2)`` (Q6_K: ``qw[col]`` alone); the sub-block
searches minimise the weighted squared error and the 4/6-bit sub-block scales are themselves
fitted by ``make_qp_quants`` weighted by the sub-block weight sums.  Bytes equal llama.cpp's.
Q8_0 and MXFP4 ignore importance weights in llama.cpp, and so do they here.
"""

from __future__ import annotations

import numpy as np

from .kquants import (
    F32,
    GROUP_MAX_EPS,
    QK_K,
    _f16,
    _rint,
    _superblocks,
    finish_q2_k,
    finish_q3_k,
    finish_q45_k,
    make_qkx2_quants,
    make_qx_quants,
    pack_q4_k,
    pack_q5_k,
    superblock_weights,
)
from .ggml import _pack_q5, pack_halves

__all__ = ["make_qp_quants", "quantize_q2_k_w", "quantize_q3_k_w", "quantize_q4_k_w", "quantize_q5_k_w",
           "quantize_q4_0_w", "quantize_q5_0_w", "quantize_q5_1_w"]


def _u8(v: np.ndarray) -> np.ndarray:
    """Store into a C ``uint8_t`` (wraps modulo 256), kept as float32."""
    return np.mod(v, 256).astype(F32)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """Fit positive values x [M, n] as ``s * L`` with L in [0, nmax], weighted by qw; returns (s [M], L [M, n])."""
    M, n = x.shape
    mx = np.maximum(x.max(axis=1), F32(0)).astype(F32)
    zero = mx < GROUP_MAX_EPS
    wx = qw * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):

        def mse_of(scale, l):
            e = np.zeros(M, F32)
            for i in range(n):
                diff = x[:, i] - scale * l[:, i]
                e = e + (qw[:, i] * diff) * diff
            return e

        iscale = F32(nmax) / mx
        L = _u8(_rint(iscale[:, None] * x))
        best = mse_of(F32(1) / iscale, L)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
            mse = mse_of(F32(1) / iscale_is, np.minimum(_rint(iscale_is[:, None] * x), nmax))
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale).astype(F32)
        l = np.minimum(_rint(iscale[:, None] * x), nmax)
        L = _u8(l)
        sumlx = np.zeros(M, F32)
        suml2 = np.zeros(M, F32)
        for i in range(n):
            sumlx = sumlx + wx[:, i] * l[:, i]
            suml2 = suml2 + (qw[:, i] * l[:, i]) * l[:, i]
        for _ in range(5):  # a round without a change would repeat itself: equal to ggml's early break
            changed = np.zeros(M, bool)
            for i in range(n):
                li = L[:, i]
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - (qw[:, i] * li) * li
                new_l = np.minimum(_rint((x[:, i] * sl2) / slx), nmax)
                slx_n = slx + wx[:, i] * new_l
                sl2_n = sl2 + (qw[:, i] * new_l) * new_l
                accept = (slx > 0) & (sl2 > 0) & (new_l != li) & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n)
                L[:, i] = np.where(accept, _u8(new_l), li)
                sumlx = np.where(accept, slx_n, sumlx)
                suml2 = np.where(accept, sl2_n, suml2)
                changed |= accept
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], F32(0), L)


def _element_weights(xb: np.ndarray, qwb: np.ndarray, sigma_factor: int) -> np.ndarray:
    """``qw * sqrt(sigma2 + x^2)`` with ``sigma2 = factor * sum(x^2) / 256`` over the super-block."""
    sumx2 = np.zeros(len(xb), F32)
    for j in range(QK_K):
        sumx2 = sumx2 + xb[:, j] * xb[:, j]
    sigma2 = (F32(sigma_factor) * sumx2) / F32(QK_K) if sigma_factor != 1 else sumx2 / F32(QK_K)
    return qwb * np.sqrt(sigma2[:, None] + xb * xb)


def _sub_sums(w: np.ndarray, sub: int) -> np.ndarray:
    """Sequential float32 sums of the weights of each sub-block: [N, 256] -> [N, 256/sub]."""
    ws = w.reshape(len(w), -1, sub)
    s = np.zeros(ws.shape[:2], F32)
    for i in range(sub):
        s = s + ws[:, :, i]
    return s


def quantize_q2_k_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    xb = _superblocks(x)
    N = len(xb)
    w = _element_weights(xb, superblock_weights(qw, x.shape), 1)
    sw = _sub_sums(w, 16)
    scales, mins, L = make_qkx2_quants(xb.reshape(N * 16, 16), w.reshape(N * 16, 16), 3, -0.9, 0.05, 36, False)
    dm, ls = make_qp_quants(scales.reshape(N, 16), 15, sw)
    mm, lm = make_qp_quants(mins.reshape(N, 16), 15, sw)
    return finish_q2_k(xb, ls, lm, _f16(dm), _f16(mm), L.reshape(N, 16, 16)).reshape(x.shape[0], -1)


def quantize_q3_k_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    xb = _superblocks(x)
    N = len(xb)
    w = _element_weights(xb, superblock_weights(qw, x.shape), 2)
    sw = _sub_sums(w, 16)
    scales, L = make_qx_quants(xb.reshape(N * 16, 16), 4, rmse_type=1, qw=w.reshape(N * 16, 16))
    d_block, l6 = make_qx_quants(scales.reshape(N, 16), 32, rmse_type=1, qw=sw)
    return finish_q3_k(xb, l6, _f16(d_block), L.reshape(N, 16, 16)).reshape(x.shape[0], -1)


def _q45_k_w(x: np.ndarray, qw: np.ndarray, nmax: int):
    xb = _superblocks(x)
    N = len(xb)
    w = _element_weights(xb, superblock_weights(qw, x.shape), 2)
    sw = _sub_sums(w, 32)
    scales, mins, L = make_qkx2_quants(xb.reshape(N * 8, 32), w.reshape(N * 8, 32), nmax, -0.9, 0.05, 36, False)
    d_block, ls = make_qp_quants(scales.reshape(N, 8), 63, sw)
    m_block, lm = make_qp_quants(mins.reshape(N, 8), 63, sw)
    if nmax == 31:  # the Q5_K impl clamps the 6-bit codes, the Q4_K impl does not
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return finish_q45_k(xb, ls, lm, _f16(d_block), _f16(m_block), L.reshape(N, 8, 32), nmax)


def quantize_q4_k_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return pack_q4_k(*_q45_k_w(x, qw, 15)).reshape(x.shape[0], -1)


def quantize_q5_k_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return pack_q5_k(*_q45_k_w(x, qw, 31)).reshape(x.shape[0], -1)


def _row_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Legacy formats: ``qw * sqrt(sigma2 + x^2)`` with ``sigma2 = sum(x^2) / K`` over the whole row."""
    rows, K = x.shape
    if K % 32:
        raise ValueError(f"needs K a multiple of 32, got {K}")
    qw = np.ascontiguousarray(qw, dtype=F32).reshape(-1)
    if qw.shape[0] != K:
        raise ValueError(f"importance weights have {qw.shape[0]} values, the tensor rows have {K}")
    sumx2 = np.zeros(rows, F32)
    for j in range(K):
        sumx2 = sumx2 + x[:, j] * x[:, j]
    return qw[None, :] * np.sqrt((sumx2 / F32(K))[:, None] + x * x)


def quantize_q4_0_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q4_0 with importance: ``make_qx_quants(32, 8)`` per block, no re-quantization."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = _row_weights(x, qw)
    d, L = make_qx_quants(x.reshape(-1, 32), 8, rmse_type=1, qw=w.reshape(-1, 32))
    d16 = _f16(d).astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([d16, pack_halves(L.astype(np.uint8))], 1).reshape(x.shape[0], -1)


def quantize_q5_0_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q5_0 with importance: ``make_qx_quants(32, 16)`` per block."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = _row_weights(x, qw)
    d, L = make_qx_quants(x.reshape(-1, 32), 16, rmse_type=1, qw=w.reshape(-1, 32))
    qh, qs = _pack_q5(L.astype(np.uint32))
    d16 = _f16(d).astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([d16, qh, qs], 1).reshape(x.shape[0], -1)


def quantize_q5_1_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q5_1 with importance: ``make_qkx3_quants(32, 31, rmin=-0.9, rdelta=0.05, nstep=36)`` per block."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = _row_weights(x, qw)
    d, the_min, L = make_qkx2_quants(x.reshape(-1, 32), w.reshape(-1, 32), 31, -0.9, 0.05, 36, False)
    qh, qs = _pack_q5(L.astype(np.uint32))
    d16 = _f16(d).astype("<f2").view(np.uint8).reshape(-1, 2)
    m16 = _f16(-the_min).astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([d16, m16, qh, qs], 1).reshape(x.shape[0], -1)
