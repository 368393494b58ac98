"""Self-test of the transformers reference harness (tests/reference/hf_kimi.py)."""

import importlib.util
import json
import re

import pytest
import torch

pytest.importorskip("transformers.models.kimi_linear")
if importlib.util.find_spec("fla") and importlib.util.find_spec("triton"):
    pytest.skip("fla + triton importable: transformers binds Triton KDA kernels", allow_module_level=True)

from safetensors import safe_open  # noqa: E402

from tests.reference.hf_kimi import (  # noqa: E402
    PRESETS,
    TINY,
    TWO_MLA_TWO_DENSE,
    build_hf_checkpoint,
    build_hf_model,
    expected_names,
    hf_greedy,
    hf_logits,
    layer_schedule,
    load_hf_model,
    to_original_state_dict,
)


def _ids(vocab, shape, seed=1):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _read_all(d):
    """name -> (shape, dtype, file) over every safetensors file in d."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                assert k not in out, f"{k} stored twice"
                t = sf.get_tensor(k)
                out[k] = (tuple(t.shape), t.dtype, f.name, t.numel() * t.element_size())
    return out


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    return build_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny3"), seed=0, n_shards=3)


def test_schedules():
    assert layer_schedule(TINY) == [("kda", "dense"), ("kda", "moe"), ("kda", "moe"), ("mla", "moe")]
    s = layer_schedule(TWO_MLA_TWO_DENSE)
    assert [a for a, _ in s].count("mla") >= 2 and [f for _, f in s].count("dense") == 2
    assert TWO_MLA_TWO_DENSE["num_expert_group"] > 1 and TWO_MLA_TWO_DENSE["topk_group"] < 4


def test_tiny_three_shards_layout(tiny3):
    assert json.loads((tiny3 / "config.json").read_text()) == TINY
    shards = sorted(p.name for p in tiny3.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tiny3 / "model.safetensors.index.json").read_text())
    stored = _read_all(tiny3)
    exp = expected_names(TINY)
    assert set(index["weight_map"]) == set(exp) == set(stored)
    for k, (shape, dtype, fname, _) in stored.items():
        assert shape == exp[k], k
        assert dtype == torch.float32, k
        assert index["weight_map"][k] == fname, k
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v[3] for v in stored.values())
    # spot-check the original naming conventions
    assert stored["model.layers.1.self_attn.A_log"][0] == (1, 1, 4, 1)
    assert stored["model.layers.0.self_attn.q_conv1d.weight"][0] == (128, 1, 4)
    assert "model.layers.0.mlp.gate_proj.weight" in stored
    assert "model.layers.3.block_sparse_moe.experts.7.w2.weight" in stored
    assert not any(re.search(r"forget_gate|\.conv1d\.|gate_up_proj|layers\.[1-3]\.mlp\.", k) for k in stored)


def test_tiny_reload_matches_in_memory(tiny3):
    model = build_hf_model(TINY, seed=0)
    ids = _ids(TINY["vocab_size"], (2, 80))  # > 64 tokens: two KDA chunks
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    got = hf_logits(tiny3, ids)
    assert got.dtype == torch.float32 and got.shape == (2, 80, TINY["vocab_size"])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_two_mla_two_dense_single_file(tmp_path):
    cfg = TWO_MLA_TWO_DENSE
    d = build_hf_checkpoint(cfg, tmp_path, seed=1)
    assert not (d / "model.safetensors.index.json").exists()
    stored = _read_all(d)
    exp = expected_names(cfg)
    assert {k: v[0] for k, v in stored.items()} == exp
    assert {k for k in stored if ".mlp." in k} == {
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")
    }
    model = build_hf_model(cfg, seed=1)
    ids = _ids(cfg["vocab_size"], (1, 70))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(hf_logits(d, ids), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_conversion_equals_save_pretrained(name, tmp_path):
    """Our writer == transformers' own reverse mapping, except that save_pretrained (5.23) also renames every dense
    layer's mlp.* to block_sparse_moe.*; we keep the original mlp.* names."""
    cfg = PRESETS[name]
    model = build_hf_model(cfg, seed=2)
    ours = to_original_state_dict(model, cfg)
    model.save_pretrained(tmp_path)
    theirs = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            theirs |= {k: sf.get_tensor(k) for k in sf.keys()}
    dense = [i for i, (_, f) in enumerate(layer_schedule(cfg)) if f == "dense"]
    fixed = {}
    for k, v in theirs.items():
        for i in dense:
            k = k.replace(f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp.")
        fixed[k] = v
    assert set(fixed) == set(ours)
    for k in ours:
        assert torch.equal(fixed[k], ours[k]), k


def test_greedy_matches_generate_and_reforward(tiny3):
    model = load_hf_model(tiny3)
    prompt = _ids(TINY["vocab_size"], (1, 20), seed=3)
    toks = hf_greedy(tiny3, prompt, 10, model=model)
    assert len(toks) == 10
    seq = torch.cat([prompt, torch.tensor([toks])], dim=1)
    assert hf_logits(tiny3, seq, model=model)[0, 19:-1].argmax(-1).tolist() == toks
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=10, do_sample=False)
    n = gen.shape[1] - 20  # generate may stop early at EOS
    assert gen[0, 20:].tolist() == toks[:n]


def test_left_padding_is_transparent(tiny3):
    """transformers zeroes padded positions before every KDA layer, so left padding with a mask leaves the real
    tokens' logits unchanged (up to chunk-alignment rounding)."""
    model = load_hf_model(tiny3)
    ids = _ids(TINY["vocab_size"], (1, 50), seed=4)
    ref = hf_logits(tiny3, ids, model=model)
    padded = torch.cat([torch.zeros(1, 30, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 30, dtype=torch.long), torch.ones(1, 50, dtype=torch.long)], dim=1)
    torch.testing.assert_close(hf_logits(tiny3, padded, mask, model=model)[:, 30:], ref, rtol=0, atol=1e-5)
