"""GGUF k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: llama.cpp's scale searches and 256-weight block layouts.

numpy re-statements of ``quantize_row_q{2..6}_K_ref`` in ``ggml/src/ggml-quants.c`` that give the
same bytes.  The searches run vectorised over all sub-blocks of a tensor while the per-element
sums inside a sub-block are accumulated one element at a time in float32, in the C order, so the
rounding matches the C loop exactly (``nearest_int`` = ``np.rint``, half to even).

Layouts (``ggml-common.h``; QK_K = 256):

* Q2_K (84 B):  ``u8 scales[16]`` (lo nibble scale, hi nibble min) | ``u8 qs[64]`` | ``f16 d, dmin``
* Q3_K (110 B): ``u8 hmask[32]`` | ``u8 qs[64]`` | ``u8 scales[12]`` (16 x 6 bit) | ``f16 d``
* Q4_K (144 B): ``f16 d, dmin`` | ``u8 scales[12]`` (8 x 6-bit scale + 8 x 6-bit min) | ``u8 qs[128]``
* Q5_K (176 B): ``f16 d, dmin`` | ``u8 scales[12]`` | ``u8 qh[32]`` | ``u8 qs[128]``
* Q6_K (210 B): ``u8 ql[128]`` | ``u8 qh[64]`` | ``i8 scales[16]`` | ``f16 d``

With importance weights (an imatrix row ``qw[K]``) the ``quantize_q*_K`` "impl" searches of
``kimiq.quant.kquants_imatrix`` are used instead, as llama.cpp does whenever weights are given.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "QK_K",
    "make_qx_quants",
    "make_q3_quants",
    "make_qkx2_quants",
    "quantize_q2_k",
    "quantize_q3_k",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "pack_scale_min_k4",
    "unpack_scale_min_k4",
]

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


def _superblocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"k-quants need a [rows, K] array with K a multiple of {QK_K}, got {tuple(x.shape)}")
    return x.reshape(-1, QK_K)


def _f16(d: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, like GGML_FP32_TO_FP16)."""
    return d.astype(np.float16)


def _f16_bytes(d16: np.ndarray) -> np.ndarray:
    return d16.astype("<f2").view(np.uint8).reshape(-1, 2)


def _abs_argmax_signed(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First element of largest |a| per row (ggml's running strict '>' update): (|a|, a)."""
    idx = np.argmax(np.abs(a), axis=1)
    v = a[np.arange(len(a)), idx]
    return np.abs(v), v


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int`` (float32 magic-number rounding: half to even), kept as float32."""
    return np.rint(v).astype(F32)


def superblock_weights(qw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An importance row ``qw [K]`` repeated for every row of a [rows, K] tensor: [rows * K/256, 256]."""
    qw = np.ascontiguousarray(qw, dtype=F32).reshape(-1)
    rows, K = shape
    if qw.shape[0] != K:
        raise ValueError(f"importance weights have {qw.shape[0]} values, the tensor rows have {K}")
    return np.broadcast_to(qw.reshape(1, K // QK_K, QK_K), (rows, K // QK_K, QK_K)).reshape(-1, QK_K)


def _pos_max(a: np.ndarray) -> np.ndarray:
    """``m = 0; for v in a: if (v > m) m = v`` per row."""
    return np.maximum(a.max(axis=1), F32(0)).astype(F32)


# ----------------------------------------------------------------------------- scale searches


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int = 1, qw: np.ndarray | None = None):
    """Symmetric ``x ~ s*q``, ``q in [-nmax, nmax-1]``; returns (scale [M], L [M, n] = q + nmax)."""
    M, n = x.shape
    amax, mx = _abs_argmax_signed(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        if qw is not None:
            w = qw.astype(F32)
        elif rmse_type == 1:
            w = x * x
        elif rmse_type == 2:
            w = np.ones_like(x)
        elif rmse_type == 3:
            w = np.abs(x)
        else:
            w = np.sqrt(np.abs(x))
        wx = w * x

        def trial(iscale):
            l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
            sumlx = np.zeros(M, F32)
            suml2 = np.zeros(M, F32)
            for i in range(n):
                sumlx = sumlx + wx[:, i] * l[:, i]
                suml2 = suml2 + (w[:, i] * l[:, i]) * l[:, i]
            return l, sumlx, suml2

        iscale = F32(-nmax) / mx
        L, sumlx, suml2 = trial(iscale)
        if rmse_type == 0:
            scale = F32(1) / iscale
        else:
            scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
            best = scale * sumlx
            for step in range(-9, 10):
                if step == 0:
                    continue
                iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
                l, sumlx, suml2 = trial(iscale)
                better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
                L = np.where(better[:, None], l, L)
                new_scale = np.where(better, sumlx / suml2, scale).astype(F32)
                best = np.where(better, new_scale * sumlx, best).astype(F32)
                scale = new_scale
    L = np.where(zero[:, None], F32(0), L + F32(nmax))
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int = 4):
    """Q3_K sub-block search (``do_rmse``: weights x^2, up to 5 rounds of coordinate descent)."""
    M, n = x.shape
    amax, mx = _abs_argmax_signed(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        sumlx = np.zeros(M, F32)
        suml2 = np.zeros(M, F32)
        for i in range(n):
            sumlx = sumlx + wx[:, i] * L[:, i]
            suml2 = suml2 + (w[:, i] * L[:, i]) * L[:, i]
        # A row whose round changes nothing would change nothing in later rounds either, so running
        # all 5 rounds equals ggml's early 'break'.
        for _ in range(5):
            any_change = np.zeros(M, bool)
            for i in range(n):
                li = L[:, i]
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - (w[:, i] * li) * li
                new_l = np.clip(_rint((x[:, i] * sl2) / slx), -nmax, nmax - 1)
                slx_n = slx + wx[:, i] * new_l
                sl2_n = sl2 + (w[:, i] * new_l) * new_l
                accept = (
                    (slx > 0) & (new_l != li) & (sl2_n > 0) & ((slx_n * slx_n) * suml2 > (sumlx * sumlx) * sl2_n)
                )
                L[:, i] = np.where(accept, new_l, li)
                sumlx = np.where(accept, slx_n, sumlx)
                suml2 = np.where(accept, sl2_n, suml2)
                any_change |= accept
            if not any_change.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero[:, None], F32(0), L + F32(nmax))
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
):
    """Asymmetric ``x ~ s*q - m`` search (q in [0, nmax]); returns (scale [M], the_min [M], L [M, n])."""
    M, n = x.shape
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    flat = mx == mn

    def err_of(scale, m, L):
        e = np.zeros(M, F32)
        for i in range(n):
            diff = (scale * L[:, i] + m) - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            e = e + w[:, i] * diff
        return e

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        best = err_of(scale, mn, L)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            la = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            sum_l = np.zeros(M, F32)
            sum_l2 = np.zeros(M, F32)
            sum_xl = np.zeros(M, F32)
            for i in range(n):
                wl = w[:, i] * la[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * la[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            cur = err_of(this_scale, this_min, la)
            better = (D > 0) & (cur < best)
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale).astype(F32)
            mn = np.where(better, this_min, mn).astype(F32)
    L = np.where(flat[:, None], F32(0), L)
    scale = np.where(flat, F32(0), scale).astype(F32)
    return scale, (-mn).astype(F32), L


# ----------------------------------------------------------------------------- shared packing


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [N, 8] -> the 12-byte ``scales`` field of Q4_K / Q5_K."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.zeros((len(ls), 12), np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: [N, 12] -> (sc [N, 8], m [N, 8]) uint8."""
    sc = np.empty((len(s), 8), np.uint8)
    m = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """[N, 256] codes 0..3 -> [N, 64]: byte 32h + l holds elements 128h + l + {0, 32, 64, 96} at bits 0,2,4,6."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)  # [N, half, shift, l]
    q = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return q.reshape(-1, 64)


def _requant(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int, L: np.ndarray) -> np.ndarray:
    """Re-quantize sub-blocks [N, S, n] with the final per-sub-block d (and dm); d == 0 keeps the search's L."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x + dm[..., None]) / d[..., None] if dm is not None else x / d[..., None]
        q = np.clip(_rint(v), lo, hi)
    return np.where((d != 0)[..., None], q, L)


# ----------------------------------------------------------------------------- formats


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    xb = _superblocks(x)
    N = len(xb)
    sub = xb.reshape(N * 16, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(N, 16), mins.reshape(N, 16), L.reshape(N, 16, 16)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale[:, None] > 0, _rint((F32(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, _rint((F32(15) / max_min)[:, None] * mins), 0)
    d = np.where(max_scale > 0, _f16(max_scale / F32(15)), np.float16(0))
    dmin = np.where(max_min > 0, _f16(max_min / F32(15)), np.float16(0))
    return finish_q2_k(xb, ls, lm, d, dmin, L).reshape(x.shape[0], -1)


def finish_q2_k(xb, ls, lm, d, dmin, L) -> np.ndarray:
    """Pack Q2_K from sub-block codes ls/lm [N, 16] (4 bit each), f16 d/dmin [N] and search codes L [N, 16, 16]."""
    N = len(xb)
    sc = ((ls.astype(np.int64) & 0xFF) | (lm.astype(np.int64) << 4)) & 0xFF
    dj = d.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    dmj = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    L = _requant(xb.reshape(N, 16, 16), dj, dmj, 0, 3, L)
    return np.concatenate([sc.astype(np.uint8), _pack_2bit(L.reshape(N, 256)), _f16_bytes(d), _f16_bytes(dmin)], 1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    xb = _superblocks(x)
    N = len(xb)
    scales, L = make_q3_quants(xb.reshape(N * 16, 16), 4)
    scales, L = scales.reshape(N, 16), L.reshape(N, 16, 16)
    _, max_scale = _abs_argmax_signed(scales)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        l6 = np.where(nz[:, None], np.clip(_rint(iscale[:, None] * scales), -32, 31) + 32, 0).astype(np.uint8)
        d = np.where(nz, _f16(F32(1) / iscale), np.float16(0))
    return finish_q3_k(xb, l6, d, L).reshape(x.shape[0], -1)


def finish_q3_k(xb, l6, d, L) -> np.ndarray:
    """Pack Q3_K from 6-bit sub-block scales l6 [N, 16] (biased by 32), f16 d [N] and search codes L (0..7)."""
    N = len(xb)
    l6 = l6.astype(np.uint8)
    s = np.zeros((N, 12), np.uint8)
    s[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = l6 >> 4  # [N, 16], 2 bits each; sub-block j -> byte 8 + j%4, bits 2*(j//4)
    for j in range(16):
        s[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    dj = d.astype(F32)[:, None] * (l6.astype(F32) - F32(32))
    L = (_requant(xb.reshape(N, 16, 16), dj, None, -4, 3, L - F32(4)) + F32(4)).reshape(N, 256).astype(np.uint8)
    high = (L > 3).reshape(N, 8, 32)  # element j -> hmask[j % 32] bit j // 32
    hmask = np.zeros((N, 32), np.uint8)
    for b in range(8):
        hmask |= high[:, b].astype(np.uint8) << b
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), s, _f16_bytes(d)], 1)


def _q45_k_scales(xb: np.ndarray, nmax: int, rmin: float, nstep: int):
    N = len(xb)
    sub = xb.reshape(N * 8, 32)
    sum_x2 = np.zeros(N * 8, F32)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(N, 8), mins.reshape(N, 8), L.reshape(N, 8, 32)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)
    lm = np.minimum(_rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63)
    return finish_q45_k(xb, ls, lm, _f16(max_scale / F32(63)), _f16(max_min / F32(63)), L, nmax)


def finish_q45_k(xb, ls, lm, d, dmin, L, nmax: int):
    """Final Q4_K/Q5_K codes from 6-bit ls/lm [N, 8], f16 d/dmin [N] and search codes L [N, 8, 32]."""
    N = len(xb)
    s = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(s)
    dj = d.astype(F32)[:, None] * sc.astype(F32)
    dmj = dmin.astype(F32)[:, None] * m.astype(F32)
    L = _requant(xb.reshape(N, 8, 32), dj, dmj, 0, nmax, L).reshape(N, 256).astype(np.uint8)
    return d, dmin, s, L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    return pack_q4_k(*_q45_k_scales(_superblocks(x), 15, -1.0, 20)).reshape(x.shape[0], -1)


def pack_q4_k(d, dmin, s, L) -> np.ndarray:
    L = L.reshape(-1, 4, 2, 32)  # [N, chunk of 64, low/high nibble, l]
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), s, qs], 1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    return pack_q5_k(*_q45_k_scales(_superblocks(x), 31, -0.5, 15)).reshape(x.shape[0], -1)


def pack_q5_k(d, dmin, s, L) -> np.ndarray:
    L = L.reshape(-1, 4, 2, 32)  # [N, chunk, half, l]; element 64c + 32h + l
    hbit = L >> 4
    qh = np.zeros((len(L), 32), np.uint8)
    for c in range(4):
        qh |= (hbit[:, c, 0] << (2 * c)) | (hbit[:, c, 1] << (2 * c + 1))
    lo = L & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), s, qh, qs], 1)


def quantize_q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Q6_K; with importance weights ``qw [K]`` they weight the sub-block search directly (llama.cpp's impl)."""
    xb = _superblocks(x)
    N = len(xb)
    qwb = None if qw is None else superblock_weights(qw, x.shape).reshape(N * 16, 16)
    scales, L = make_qx_quants(xb.reshape(N * 16, 16), 32, rmse_type=1, qw=qwb)
    scales, L = scales.reshape(N, 16), L.reshape(N, 16, 16)
    max_abs, max_scale = _abs_argmax_signed(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d = np.where(zero, np.float16(0), _f16(F32(1) / iscale))
        sc = np.where(zero[:, None], 0, np.minimum(_rint(iscale[:, None] * scales), 127)).astype(np.int8)
    dj = d.astype(F32)[:, None] * sc.astype(F32)
    L = _requant(xb.reshape(N, 16, 16), dj, None, -32, 31, L - F32(32)) + F32(32)
    L = np.where(zero[:, None, None], 0, L).reshape(N, 2, 4, 32).astype(np.uint8)  # [N, half, quarter, l]
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # [N, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [N, 2, 32]
    out = np.concatenate([ql.reshape(N, 128), qh.reshape(N, 64), sc.view(np.uint8), _f16_bytes(d)], 1)
    return out.reshape(x.shape[0], -1)
