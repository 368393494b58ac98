"""Recipes: llama.cpp's per-tensor choices reproduce the published Kimi-Linear GGUF sizes; rules and files."""

from __future__ import annotations

import json

import pytest

from kimiq.config import KIMI_LINEAR_48B_HF, ModelConfig
from kimiq.quant.recipes import KEEP, PROTECTED_ROLES, RECIPES, get_recipe, plan_bytes, tensor_specs, use_more_bits


@pytest.fixture(scope="module")
def real():
    return ModelConfig.from_hf(KIMI_LINEAR_48B_HF)


def _gguf_keep_bits(spec) -> int:
    # GGUF stores 1-D tensors, norms, the short convs, decay parameters and the router (ffn_gate_inp) in F32
    return 32 if len(spec.shape) != 2 or spec.role in PROTECTED_ROLES else 16


@pytest.mark.parametrize("recipe,card_gb", [("q4_k_m", 29.70), ("q5_k_m", 34.87), ("mxfp4_moe", 27.21)])
def test_real_48b_sizes_match_the_gguf_card(real, recipe, card_gb):
    """hf:ymcki/Kimi-Linear-48B-A3B-Instruct-GGUF file sizes (decimal GB), from the per-tensor choices alone."""
    total, params = plan_bytes(real, RECIPES[recipe].plan(real), _gguf_keep_bits)
    assert params == 49_122_681_728
    assert abs(total / 1e9 - card_gb) < 0.015, f"{recipe}: {total / 1e9:.3f} GB vs card {card_gb}"


def test_llama_cpp_layer_spread(real):
    assert [i for i in range(27) if use_more_bits(i, 27)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]
    plan = RECIPES["q4_k_m"].plan(real)
    specs = {s.name: s for s in tensor_specs(real)}
    v6 = sorted(specs[n].layer for n, f in plan.items() if specs[n].role == "attn_v" and f == "q6_k")
    assert v6 == [0, 1, 5, 9, 13, 17, 21, 22, 24, 25]  # quantization-formats.md §3.4
    down6 = {specs[n].layer for n, f in plan.items() if specs[n].role == "exp_down" and f == "q6_k"}
    assert down6 == {1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26}  # layer 0 is the dense MLP
    assert plan["model.layers.0.mlp.down_proj.weight"] == "q6_k"
    assert plan["lm_head.weight"] == "q6_k" and plan["model.embed_tokens.weight"] == "q4_k"
    # 128-wide inputs (KDA f_b / g_b) fall back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0
    assert plan["model.layers.0.self_attn.f_b_proj.weight"] == "q5_0"
    assert RECIPES["q2_k"].plan(real)["model.layers.0.self_attn.f_b_proj.weight"] == "q4_0"


def test_protected_tensors_stay_high_precision(real):
    for name, r in RECIPES.items():
        plan = r.plan(real)
        for s in tensor_specs(real):
            if s.role in PROTECTED_ROLES and not (s.role == "router" and name in ("mxfp4-g32", "affine4-g64")):
                assert plan[s.name] == KEEP, (name, s.name)
    assert RECIPES["mxfp4-g32"].plan(real)["model.layers.1.block_sparse_moe.gate.weight"] == "affine8-g64"
    assert RECIPES["mxfp4-g32"].plan(real)["model.layers.1.block_sparse_moe.experts.0.w1.weight"] == "mxfp4-mlx"


def test_mixed_36(real):
    plan = RECIPES["mixed-3.6"].plan(real)
    assert plan["model.layers.3.block_sparse_moe.experts.7.w1.weight"] == "affine3-g64"
    assert plan["model.layers.3.block_sparse_moe.experts.7.w2.weight"] == "affine3-g64"
    assert plan["model.layers.5.block_sparse_moe.experts.7.w2.weight"] == "affine4-g64"
    assert plan["model.layers.3.self_attn.q_proj.weight"] == "affine6-g64"
    assert plan["model.layers.3.block_sparse_moe.gate.weight"] == KEEP
    total, params = plan_bytes(real, plan)
    assert 3.5 < 8 * total / params < 3.8  # "3.6-bit"


def test_recipe_file(tmp_path, real):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"name": "mine", "default": "q4_k", "rules": [
        {"match": r"experts\.\d+\.w2", "format": "q6_k"}, {"match": r"gate\.weight$", "format": "q8_0"},
        {"match": "embed_tokens", "format": "keep"}]}))
    r = get_recipe(str(p))
    plan = r.plan(real)
    assert r.name == "mine"
    assert plan["model.layers.2.block_sparse_moe.experts.9.w2.weight"] == "q6_k"
    assert plan["model.layers.2.block_sparse_moe.gate.weight"] == "q8_0"  # named on purpose: quantized
    assert plan["model.embed_tokens.weight"] == KEEP
    assert plan["model.layers.2.input_layernorm.weight"] == KEEP and plan["lm_head.weight"] == "q4_k"
    for bad, msg in [({"default": "q9_k"}, "unknown format"),
                     ({"rules": [{"match": "(", "format": "q4_k"}]}, "bad regex"),
                     ({"defualt": "q4_k"}, "unknown keys"), ({"rules": [{"match": "x"}]}, "must be")]:
        p.write_text(json.dumps(bad))
        with pytest.raises((ValueError, KeyError), match=msg):
            get_recipe(str(p))
    with pytest.raises(KeyError, match="unknown recipe"):
        get_recipe("q4_k_z")
