"""compressed-tensors ``pack-quantized`` INT4 input (the Kimi-K2 expert format), read one tensor at a time.

A checkpoint whose config.json has ``quantization_config.quant_method == "compressed-tensors"`` and
``format == "pack-quantized"`` stores each quantized Linear ``X`` as (``quantization-formats.md`` §5):

* ``X.weight_packed`` int32 ``[out, ceil(in/8)]``: signed q in [-8, 7] as ``u = q + 8``, element ``8i+k``
  in bits ``4k..4k+3`` of word ``i`` (LSB first, the same bitstream as mlx affine 4-bit);
* ``X.weight_scale`` ``[out, in/group]`` (bf16 in K2); ``X.weight_shape`` ``[2]`` (optional here);
* no zero point (symmetric): ``W = (u - 8) * scale[row, col // group]``.

``kimiq quantize`` dequantizes such a tensor in memory and re-quantizes it with the recipe, or, when
the recipe keeps it, stores it losslessly as mlx ``affine4-g{group}`` (codes as is, ``biases = -8 * scale``,
exact: a power-of-two multiple), so no full-precision copy is ever written (the mlx-lm #907 failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["compressed_tensors_config", "dequantize_int4_ct", "pack_int4_ct", "ct_as_affine"]


def compressed_tensors_config(root: str | Path) -> dict | None:
    """{"group_size", "num_bits"} of a pack-quantized symmetric INT4 checkpoint; None for other checkpoints."""
    qc = json.loads((Path(root) / "config.json").read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{root}: compressed-tensors format {qc.get('format')!r} is not supported "
                         "(kimiq reads pack-quantized)")
    groups = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
    if not groups:
        raise ValueError(f"{root}: compressed-tensors config without config_groups")
    specs = {(w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy"), w.get("group_size"))
             for w in groups}
    if len(specs) != 1:
        raise ValueError(f"{root}: several compressed-tensors weight schemes {sorted(map(str, specs))}; "
                         "kimiq reads one")
    bits, typ, sym, strategy, group = specs.pop()
    if (bits, typ, sym, strategy) != (4, "int", True, "group") or not isinstance(group, int) or group % 8:
        raise ValueError(f"{root}: compressed-tensors scheme num_bits={bits} type={typ} symmetric={sym} "
                         f"strategy={strategy} group_size={group} is not supported (kimiq reads symmetric INT4 "
                         "groups, the Kimi-K2 expert format)")
    return {"group_size": group, "num_bits": bits}


def dequantize_int4_ct(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[out, ceil(in/8)] int32 + [out, in/group] scales -> float32 [out, in]."""
    out_f, in_f = shape
    w = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    u = ((w[:, :, None] >> shifts) & 0xF).reshape(out_f, -1)[:, :in_f]  # padding removed
    group = in_f // scale.shape[1]
    s = scale.to(torch.float32).repeat_interleave(group, dim=1)
    return (u.to(torch.float32) - 8) * s


def pack_int4_ct(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed-tensors library rule (for building test checkpoints): ``scale = amax / 7.5`` per group,
    ``q = clamp(round_half_even(w / scale), -8, 7)``; returns (weight_packed int32, weight_scale bf16)."""
    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // group, group)
    scale = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
    sf = scale.float().clamp(min=1e-12)[..., None]
    q = torch.clamp(torch.round(g / sf), -8, 7).to(torch.int64).view(out_f, in_f) + 8
    q = torch.nn.functional.pad(q, (0, -in_f % 8)).view(out_f, -1, 8)
    words = (q << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)  # < 2^32
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32), scale


def ct_as_affine(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> tuple[str, dict]:
    """Lossless kimiq parts for a kept INT4 tensor: (format name, parts) in mlx affine 4-bit layout."""
    out_f, in_f = shape
    group = in_f // scale.shape[1]
    if in_f % 8 or group not in (32, 64, 128):
        raise ValueError(f"INT4 tensor of shape {shape} with group {group} has no lossless affine form; "
                         "quantize it with the recipe instead")
    return f"affine4-g{group}", {"weight": packed.contiguous(), "scales": scale.clone(), "biases": scale * -8}
