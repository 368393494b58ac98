"""MLX-layout formats: affine 2/3/4/5/6/8-bit with per-group scale and bias, and MXFP4 (mlx packing).

Affine follows mlx's zero-aligned algorithm (``mlx/ops.cpp`` / ``backend/cpu/quantized.cpp``;
``../shared/reference/quantization-formats.md`` §2.2), per group of ``g`` consecutive inputs::

    n = 2^b - 1;  s = max((wmax - wmin) / n, 1e-7)
    edge = wmin if |wmin| > |wmax| else wmax (and s = -s);  q0 = rint(edge / s)
    q0 != 0: s = edge / q0, bias = edge        else: bias = 0
    q = clip(rint((w - bias) / s), 0, n);      w^ = s * q + bias

Codes are one little-endian LSB-first bitstream per row stored as ``uint32 [rows, K*b/32]``
(element k in bits [k*b, (k+1)*b)); scales and biases are ``[rows, K/g]`` in the weight dtype.
MXFP4 in mlx: ``uint32 [rows, K/8]`` (element 8i+k in bits 4k..4k+3 of word i) and raw E8M0
exponents ``uint8 [rows, K/32]``; mlx picks ``ceil(log2(amax/6))`` (see ``kimiq.quant.ggml``).
"""

from __future__ import annotations

import numpy as np
import torch

from .ggml import mxfp4_codes, mxfp4_exponent

__all__ = ["quantize_affine", "dequantize_affine", "pack_bits", "unpack_bits", "quantize_mxfp4_mlx",
           "AFFINE_BITS", "AFFINE_GROUPS"]

F32 = np.float32
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [rows, K] (each < 2^bits) -> uint32 [rows, K*bits/32], LSB-first bitstream per row."""
    rows, K = codes.shape
    if (K * bits) % 32:
        raise ValueError(f"{K} codes of {bits} bits do not fill whole 32-bit words")
    shifts = np.arange(bits, dtype=np.uint32)
    bitplanes = ((codes.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8)  # [rows, K, bits]
    packed = np.packbits(bitplanes.reshape(rows, K * bits), axis=1, bitorder="little")  # [rows, K*bits/8]
    return packed.view("<u4").astype(np.uint32)


def unpack_bits(words: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """uint32/int32 words [rows, K*bits/32] -> int64 codes [rows, K] (torch, any device)."""
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [rows, W]
    if 32 % bits == 0:  # codes never straddle words
        per = 32 // bits
        shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
        return ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], K)
    idx = torch.arange(K, device=w.device, dtype=torch.int64) * bits  # first bit of each code
    word, off = idx // 32, idx % 32
    lo = w[:, word] >> off
    nxt = torch.clamp(word + 1, max=w.shape[1] - 1)
    hi = torch.where(off + bits > 32, w[:, nxt] << (32 - off), torch.zeros_like(lo))
    return (lo | hi) & ((1 << bits) - 1)


def quantize_affine(w: torch.Tensor, bits: int = 4, group_size: int = 64):
    """w [rows, K] (fp32/bf16/fp16) -> (uint32 codes [rows, K*bits/32], scales, biases [rows, K/g] in w.dtype)."""
    if bits not in AFFINE_BITS:
        raise ValueError(f"affine bits must be one of {AFFINE_BITS}, got {bits}")
    if group_size not in AFFINE_GROUPS:
        raise ValueError(f"affine group size must be one of {AFFINE_GROUPS}, got {group_size}")
    rows, K = w.shape
    if K % group_size:
        raise ValueError(f"input width {K} is not a multiple of the group size {group_size}")
    x = w.detach().to(torch.float32).cpu().numpy().reshape(rows, K // group_size, group_size)
    n = F32(2**bits - 1)
    wmax, wmin = x.max(axis=2), x.min(axis=2)
    s = np.maximum((wmax - wmin) / n, F32(1e-7)).astype(F32)
    use_min = np.abs(wmin) > np.abs(wmax)
    edge = np.where(use_min, wmin, wmax)
    s = np.where(use_min, s, -s)
    q0 = np.rint(edge / s)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(q0 != 0, edge / q0, s).astype(F32)
    bias = np.where(q0 != 0, edge, F32(0)).astype(F32)
    q = np.clip(np.rint((x - bias[..., None]) / s[..., None]), 0, n).astype(np.uint32)
    codes = pack_bits(q.reshape(rows, K), bits)
    scales = torch.from_numpy(s).to(w.dtype)
    biases = torch.from_numpy(bias).to(w.dtype)
    return torch.from_numpy(codes.view(np.int32)), scales, biases


def dequantize_affine(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                      group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantize: ``scale * q + bias`` per group -> [rows, K] in ``dtype``."""
    rows, G = scales.shape
    K = G * group_size
    q = unpack_bits(codes, bits, K).to(torch.float32).view(rows, G, group_size)
    w = q * scales.to(torch.float32)[..., None] + biases.to(torch.float32)[..., None]
    return w.reshape(rows, K).to(dtype)


def quantize_mxfp4_mlx(w: torch.Tensor, rule: str = "mlx"):
    """MXFP4 in mlx's layout: (uint32 codes [rows, K/8] as int32, uint8 E8M0 exponents [rows, K/32])."""
    rows, K = w.shape
    if K % 32:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of 32, got {K}")
    b = w.detach().to(torch.float32).cpu().numpy().reshape(-1, 32)
    e = mxfp4_exponent(np.abs(b).max(axis=1), rule)
    codes = mxfp4_codes(b, e).reshape(rows, K)
    return torch.from_numpy(pack_bits(codes, 4).view(np.int32)), torch.from_numpy(e.reshape(rows, K // 32))
