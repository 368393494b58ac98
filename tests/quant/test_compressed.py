"""compressed-tensors pack-quantized INT4 input: refused by the loader, converted by kimiq quantize."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kimiq.config import ModelConfig
from kimiq.model.weights import CheckpointError, load_model, save_checkpoint
from kimiq.quant.checkpoint import quantize_checkpoint
from kimiq.quant.compressed import dequantize_int4_ct, pack_int4_ct
from kimiq.quant.modules import QuantExperts
from kimiq.quant.recipes import plan_bytes, get_recipe
from tests.conftest import TWO_MLA_TWO_DENSE_HF, random_model

CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False,
        "observer": "minmax"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
}  # fmt: skip


@pytest.fixture(scope="module")
def ct_ckpt(tmp_path_factory):
    """A Kimi-K2-style checkpoint: routed experts INT4 (group 32), everything else bf16."""
    cfg = ModelConfig.from_hf(dict(TWO_MLA_TWO_DENSE_HF, dtype="bfloat16"))
    root = save_checkpoint(random_model(cfg, seed=4), tmp_path_factory.mktemp("ct") / "ckpt", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(str(root / "model.safetensors"))
    out, ref = {}, {}
    for name, t in sd.items():
        if ".experts." in name:
            packed, scale = pack_int4_ct(t, 32)
            base = name.removesuffix("weight")
            out[base + "weight_packed"], out[base + "weight_scale"] = packed, scale
            out[base + "weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            ref[name] = dequantize_int4_ct(packed, scale, tuple(t.shape))
        else:
            out[name] = t
    (root / "SHA256SUMS").unlink()
    (root / "model.safetensors").unlink()
    save_file(out, str(root / "model.safetensors"))
    conf = json.loads((root / "config.json").read_text())
    conf["quantization_config"] = CT_CONFIG
    (root / "config.json").write_text(json.dumps(conf))
    return root, ref


def test_int4_pack_roundtrip():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, scale = pack_int4_ct(w, 32)
    assert packed.dtype == torch.int32 and packed.shape == (64, 12) and scale.shape == (64, 3)
    back = dequantize_int4_ct(packed, scale, (64, 96))
    err = (back - w).abs().view(64, 3, 32).amax(-1)
    # round to nearest; at the clamped +amax end (7.5 s -> 7 s) the bf16 rounding of s (relative <= 2^-8) adds
    # up to 7.5 * 2^-8 s.  (The bound said 7 * 2^-8 until 2026-12-01: ~4% of random seeds exceeded it.)
    assert bool((err <= scale.float() * (0.5 + 7.5 * 2**-8) + 1e-6).all())


def test_loader_asks_for_conversion(ct_ckpt):
    with pytest.raises(CheckpointError, match="kimiq quantize"):
        load_model(ct_ckpt[0])


def test_kept_int4_experts_are_lossless(ct_ckpt, tmp_path):
    root, ref = ct_ckpt
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"name": "keep-all", "default": "keep"}))
    out = quantize_checkpoint(root, str(keep), tmp_path / "q", progress=False, log=lambda s: None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["formats"]) == set(ref) and set(qc["formats"].values()) == {"affine4-g32"}
    model = load_model(out)
    experts = model.model.layers[2].block_sparse_moe.experts
    assert isinstance(experts, QuantExperts)
    name = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    assert torch.equal(experts.expert_weight("w2", 5, torch.float32), ref[name])


def test_requantized_from_int4_not_stuck_at_5_bits(ct_ckpt, tmp_path):
    """mlx-lm #907: a 3-bit recipe on INT4 experts must give 3-bit experts, not 5.0-bit ones."""
    root, ref = ct_ckpt
    out = quantize_checkpoint(root, "mixed-3.6", tmp_path / "q3", progress=False, log=lambda s: None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["formats"]["model.layers.3.block_sparse_moe.experts.0.w1.weight"] == "affine3-g64"
    cfg = ModelConfig.from_file(out)
    assert qc["bits_per_weight"] == round(8 * plan_bytes(cfg, get_recipe("mixed-3.6").plan(cfg))[0] /
                                          plan_bytes(cfg, get_recipe("mixed-3.6").plan(cfg))[1], 4)
    model = load_model(out)
    w = model.model.layers[3].block_sparse_moe.experts.expert_weight("w1", 0, torch.float32)
    r = ref["model.layers.3.block_sparse_moe.experts.0.w1.weight"]
    assert float((w - r).norm() / r.norm()) < 0.3  # 3-bit re-quantization of the INT4 values


def test_unsupported_schemes_are_named(ct_ckpt, tmp_path):
    root, _ = ct_ckpt
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="symmetric=False"):
        quantize_checkpoint(bad, "q8_0", tmp_path / "x", progress=False)
