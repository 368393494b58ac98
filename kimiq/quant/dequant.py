"""Reference dequantizers for the GGUF block formats, in torch (CPU or GPU).

Each takes the packed rows ``uint8 [rows, n_blocks * block_bytes]`` (a GGUF tensor's bytes
viewed as rows) and returns ``float32 [rows, K]``.  They follow ``dequantize_row_*`` in
``ggml-quants.c`` (``../shared/reference/quantization-formats.md`` §3.2) and are tested against
the ``gguf`` package's numpy dequantizers.  The fast paths of ``kimiq.quant.linear`` are tested
against these.
"""

from __future__ import annotations

import torch

__all__ = ["DEQUANTIZERS", "dequantize_gguf", "BLOCK"]

# name -> (weights per block, bytes per block)
BLOCK = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "mxfp4": (32, 17),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q2_k": (256, 84),
    "q3_k": (256, 110),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}

_KV_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _halves(qs: torch.Tensor) -> torch.Tensor:
    """[N, 16] bytes -> [N, 32] nibbles: element j low nibble of byte j, element j+16 high nibble."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _q8_0(b):
    return _f16(b[:, :2])[:, None] * b[:, 2:].view(torch.int8).to(torch.float32)


def _q4_0(b):
    return _f16(b[:, :2])[:, None] * (_halves(b[:, 2:]).to(torch.float32) - 8)


def _mxfp4(b):
    e = b[:, 0].to(torch.int32)
    half = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 128)  # 2^(e-128); e < 2 are fp32 denormals
    kv = torch.tensor(_KV_MXFP4, dtype=torch.float32, device=b.device)
    return kv[_halves(b[:, 1:]).long()] * half[:, None]


def _q5_codes(b: torch.Tensor, off: int) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit codes [N, 32] from qh at b[:, off:off+4] and qs after it."""
    qh = b[:, off:off + 4].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [N, 1]
    bits = (qh >> torch.arange(32, device=b.device)) & 1  # [N, 32]
    return _halves(b[:, off + 4:off + 20]).to(torch.int64) | (bits << 4)


def _q5_0(b):
    return _f16(b[:, :2])[:, None] * (_q5_codes(b, 2).to(torch.float32) - 16)


def _q5_1(b):
    return _f16(b[:, :2])[:, None] * _q5_codes(b, 4).to(torch.float32) + _f16(b[:, 2:4])[:, None]


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: [N, 64] -> [N, 256]; element 128h + 32s + l = (qs[32h + l] >> 2s) & 3."""
    q = qs.view(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, 256)


def _q2_k(b):
    sc, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _crumbs(qs).to(torch.float32).view(-1, 16, 16)
    scale = d[:, None] * (sc & 0xF).to(torch.float32)
    mn = dmin[:, None] * (sc >> 4).to(torch.float32)
    return (scale[..., None] * q - mn[..., None]).reshape(-1, 256)


def _q3_k(b):
    hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _crumbs(qs).to(torch.int32)
    bit = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = ((hmask.view(-1, 1, 32) >> bit) & 1).reshape(-1, 256).to(torch.int32)  # element j: hmask[j%32] bit j//32
    q = low + 4 * high - 4
    lo4 = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)  # [N, 16]
    j = torch.arange(16, device=b.device)
    hi2 = (s[:, 8 + j % 4] >> (2 * (j // 4)).to(torch.uint8)) & 3
    sc = (lo4 | (hi2 << 4)).to(torch.float32) - 32
    return ((d[:, None] * sc)[..., None] * q.view(-1, 16, 16).to(torch.float32)).reshape(-1, 256)


def _scale_min_k4(s: torch.Tensor):
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.to(torch.float32), m.to(torch.float32)


def _q4_k(b):
    d, dmin, s, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:144]
    sc, m = _scale_min_k4(s)
    q = qs.view(-1, 4, 1, 32)
    q = torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)  # sub-block 2c: low, 2c+1: high
    return ((d[:, None] * sc)[..., None] * q - (dmin[:, None] * m)[..., None]).reshape(-1, 256)


def _q5_k(b):
    d, dmin, s, qh, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:48], b[:, 48:176]
    sc, m = _scale_min_k4(s)
    q = qs.view(-1, 4, 1, 32)
    q = torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, 8, 32).to(torch.int32)
    bit = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = ((qh.view(-1, 1, 32) >> bit) & 1).to(torch.int32)  # sub-block sb: qh[l] bit sb
    q = (q + 16 * high).to(torch.float32)
    return ((d[:, None] * sc)[..., None] * q - (dmin[:, None] * m)[..., None]).reshape(-1, 256)


def _q6_k(b):
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(torch.int8), _f16(b[:, 208:210])
    ql = ql.view(-1, 2, 2, 32)  # [N, half, 32-byte part, l]
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = (qh.view(-1, 2, 1, 32) >> shifts) & 3  # [N, half, quarter, l]
    q = (low.to(torch.int32) | (high.to(torch.int32) << 4)) - 32
    scale = d[:, None] * sc.to(torch.float32)  # [N, 16]
    return (scale[..., None] * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, 256)


DEQUANTIZERS = {"q8_0": _q8_0, "q4_0": _q4_0, "mxfp4": _mxfp4, "q5_0": _q5_0, "q5_1": _q5_1, "q2_k": _q2_k,
                "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def dequantize_gguf(name: str, packed: torch.Tensor) -> torch.Tensor:
    """Packed rows ``uint8 [rows, bytes]`` of format ``name`` -> ``float32 [rows, K]``."""
    qk, nbytes = BLOCK[name]
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % nbytes:
        raise ValueError(f"{name}: expected uint8 [rows, n*{nbytes}], got {packed.dtype} {tuple(packed.shape)}")
    blocks = packed.contiguous().view(-1, nbytes)
    return DEQUANTIZERS[name](blocks).reshape(rows, -1)


# ----------------------------------------------------------------------------- int4 views for fast kernels

INT4_AFFINE = ("q4_0", "q4_k")  # GGUF formats whose weights are (q - 8) * scale + zero with 4-bit q


def gguf_int4_affine(name: str, packed: torch.Tensor, K: int):
    """Q4_0 / Q4_K rows as 4-bit codes and per-32 affine terms: ``w = (q - 8) * scale + zero``.

    Returns (q int32 [rows, K] in 0..15, scale fp32 [rows, K/32], zero fp32 [rows, K/32]); the form
    of torch's int4 CPU kernels (``_weight_int4pack_mm_for_cpu``).
    """
    rows = packed.shape[0]
    b = packed.contiguous().view(-1, BLOCK[name][1])
    if name == "q4_0":
        q = _halves(b[:, 2:])  # [N, 32]
        scale = _f16(b[:, :2])[:, None]
        zero = torch.zeros_like(scale)
    elif name == "q4_k":
        d, dmin, s, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:144]
        sc, m = _scale_min_k4(s)
        qq = qs.view(-1, 4, 1, 32)
        q = torch.cat([qq & 0xF, qq >> 4], dim=2).reshape(-1, 256)
        scale = d[:, None] * sc  # [N, 8]: y = scale * q - dmin * m
        zero = 8 * scale - dmin[:, None] * m
    else:
        raise ValueError(f"{name} has no int4 affine form")
    return q.reshape(rows, K).to(torch.int32), scale.reshape(rows, -1), zero.reshape(rows, -1)
