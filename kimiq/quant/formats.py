"""The registry of weight formats: one name -> quantize, reference dequantize, packed layout, bits per weight.

A format turns one 2-D weight ``W [out, in]`` into the tensors stored for it in a kimiq checkpoint
(``parts``: suffix -> tensor, the suffix appended to the module path) and back:

* ``f32`` / ``f16`` / ``bf16``: ``{"weight": W}`` in that dtype (passthrough).
* GGUF blocks ``q8_0 q4_0 q5_0 q5_1 mxfp4 q2_k q3_k q4_k q5_k q6_k``: ``{"weight": uint8 [out, in/blk*bytes]}``,
  each row exactly the bytes llama.cpp writes for it (``kimiq.quant.ggml`` / ``kquants``).
* mlx ``affine{2,3,4,5,6,8}-g{32,64,128}``: ``{"weight": uint32 codes, "scales", "biases"}`` as mlx-lm
  stores them; ``mxfp4-mlx``: ``{"weight": uint32 codes, "scales": uint8 E8M0}``.

``get_format(name)`` looks one up; ``FORMATS`` lists them all.  Importance weights (an imatrix
row of ``in`` values) change the GGUF k-quants and Q4_0 exactly as in llama.cpp and are ignored
by the formats that ignore them there (Q8_0, MXFP4) and by mlx formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import affine, ggml, kquants, kquants_imatrix
from .dequant import BLOCK, dequantize_gguf

__all__ = ["Format", "FORMATS", "get_format", "format_names"]

Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    """A weight format.  ``block``: the input width must be a multiple of it."""

    name: str
    family: str  # "float" | "gguf" | "mlx"
    bits_per_weight: float
    block: int
    _quantize: Callable[[torch.Tensor, np.ndarray | None], Parts]
    _dequantize: Callable[[Parts, tuple[int, int]], torch.Tensor]
    _layout: Callable[[tuple[int, int], torch.dtype], dict[str, tuple[tuple[int, ...], torch.dtype]]]
    doc: str = ""

    def layout(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """suffix -> (shape, dtype) of the stored parts of a ``shape`` weight whose checkpoint dtype is ``dtype``."""
        return self._layout(tuple(shape), dtype)

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[1] % self.block == 0

    def quantize(self, w: torch.Tensor, imatrix: torch.Tensor | np.ndarray | None = None) -> Parts:
        """w [out, in] -> stored parts.  ``imatrix``: importance of each input column, [in]."""
        if w.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight, got shape {tuple(w.shape)}")
        if not self.supports(tuple(w.shape)):
            raise ValueError(f"{self.name}: input width {w.shape[1]} is not a multiple of {self.block}")
        qw = None
        if imatrix is not None:
            qw = np.asarray(imatrix.cpu() if isinstance(imatrix, torch.Tensor) else imatrix, dtype=np.float32)
            if qw.shape != (w.shape[1],):
                raise ValueError(f"{self.name}: imatrix has shape {qw.shape}, expected ({w.shape[1]},)")
        return self._quantize(w, qw)

    def dequantize(self, parts: Parts, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantize -> [out, in] in ``dtype``."""
        return self._dequantize(parts, shape).to(dtype)

    def nbytes(self, shape: tuple[int, int]) -> int:
        return int(round(shape[0] * shape[1] * self.bits_per_weight / 8))


def _float(name: str, dtype: torch.dtype) -> Format:
    def q(w, qw):
        return {"weight": w.detach().to(dtype).contiguous()}

    def dq(parts, shape):
        return parts["weight"].to(torch.float32).view(shape)

    return Format(name, "float", torch.finfo(dtype).bits, 1, q, dq, lambda shape, dt: {"weight": (shape, dtype)},
                  f"{name} passthrough")


def _np32(w: torch.Tensor) -> np.ndarray:
    return w.detach().to(torch.float32).cpu().numpy()


def _gguf(name: str, ref: Callable, weighted: Callable | None, doc: str) -> Format:
    qk, nbytes = BLOCK[name]

    def q(w, qw):
        x = _np32(w)
        packed = weighted(x, qw) if (qw is not None and weighted is not None) else ref(x)
        return {"weight": torch.from_numpy(np.ascontiguousarray(packed))}

    def dq(parts, shape):
        return dequantize_gguf(name, parts["weight"]).view(shape)

    def layout(shape, dt):
        return {"weight": ((shape[0], shape[1] // qk * nbytes), torch.uint8)}

    return Format(name, "gguf", nbytes * 8 / qk, qk, q, dq, layout, doc)


def _affine(bits: int, group: int) -> Format:
    def q(w, qw):
        codes, scales, biases = affine.quantize_affine(w, bits, group)
        return {"weight": codes, "scales": scales, "biases": biases}

    def dq(parts, shape):
        return affine.dequantize_affine(parts["weight"], parts["scales"], parts["biases"], bits, group).view(shape)

    def layout(shape, dt):
        g = (shape[0], shape[1] // group)
        return {"weight": ((shape[0], shape[1] * bits // 32), torch.int32), "scales": (g, dt), "biases": (g, dt)}

    return Format(f"affine{bits}-g{group}", "mlx", bits + 32 / group, group, q, dq, layout,
                  f"mlx affine {bits}-bit, group {group}, bf16 scale + bias")


def _mxfp4_mlx() -> Format:
    def q(w, qw):
        codes, e = affine.quantize_mxfp4_mlx(w, rule="mlx")
        return {"weight": codes, "scales": e}

    def dq(parts, shape):
        codes = affine.unpack_bits(parts["weight"], 4, shape[1])  # [out, in] E2M1 codes
        kv = torch.tensor(ggml.KVALUES_MXFP4.tolist(), dtype=torch.float32, device=codes.device)
        e = parts["scales"].to(torch.int32)
        half = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 128)
        return (kv[codes].view(shape[0], -1, 32) * half[..., None]).view(shape)

    def layout(shape, dt):
        return {"weight": ((shape[0], shape[1] // 8), torch.int32), "scales": ((shape[0], shape[1] // 32), torch.uint8)}

    return Format("mxfp4-mlx", "mlx", 4.25, 32, q, dq, layout,
                  "MXFP4 in mlx's layout with mlx's ceil(log2(amax/6)) scale")


def _build() -> dict[str, Format]:
    fmts = [
        _float("f32", torch.float32),
        _float("f16", torch.float16),
        _float("bf16", torch.bfloat16),
        _gguf("q8_0", ggml.quantize_q8_0, None, "GGUF Q8_0: int8 + f16 scale per 32"),
        _gguf("q4_0", ggml.quantize_q4_0, kquants_imatrix.quantize_q4_0_w, "GGUF Q4_0: 4-bit + f16 scale per 32"),
        _gguf("mxfp4", ggml.quantize_mxfp4, None, "MXFP4 (E2M1 + E8M0 per 32), GGUF layout, OCP/llama.cpp scale"),
        _gguf("q5_0", ggml.quantize_q5_0, kquants_imatrix.quantize_q5_0_w, "GGUF Q5_0: 5-bit + f16 scale per 32"),
        _gguf("q5_1", ggml.quantize_q5_1, kquants_imatrix.quantize_q5_1_w, "GGUF Q5_1: 5-bit + f16 scale, min per 32"),
        _gguf("q2_k", kquants.quantize_q2_k, kquants_imatrix.quantize_q2_k_w, "GGUF Q2_K"),
        _gguf("q3_k", kquants.quantize_q3_k, kquants_imatrix.quantize_q3_k_w, "GGUF Q3_K"),
        _gguf("q4_k", kquants.quantize_q4_k, kquants_imatrix.quantize_q4_k_w, "GGUF Q4_K"),
        _gguf("q5_k", kquants.quantize_q5_k, kquants_imatrix.quantize_q5_k_w, "GGUF Q5_K"),
        _gguf("q6_k", kquants.quantize_q6_k, kquants.quantize_q6_k, "GGUF Q6_K"),
        _mxfp4_mlx(),
    ]
    fmts += [_affine(b, g) for b in affine.AFFINE_BITS for g in affine.AFFINE_GROUPS]
    return {f.name: f for f in fmts}


FORMATS: dict[str, Format] = _build()


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None
