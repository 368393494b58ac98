"""Checkpoint I/O (kimiq.model.weights): inventory, sharded round trip, corruption errors, verify."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimiq.config import KIMI_LINEAR_48B_HF, TINY_HF, ModelConfig
from kimiq.model.model import KimiLinearForCausalLM
from kimiq.model.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    SUMS_FILE,
    CheckpointError,
    checkpoint_inventory,
    load_model,
    save_checkpoint,
    _check_mapping,
    verify_checkpoint,
)
from tests.conftest import TWO_MLA_TWO_DENSE_HF, random_model

REAL_48B_HF = KIMI_LINEAR_48B_HF

CONFIGS = {"tiny": TINY_HF, "two_mla_two_dense": TWO_MLA_TWO_DENSE_HF}
FP32_LEAVES = ("A_log", "dt_bias", "gate.weight", "gate.e_score_correction_bias")


def test_inventory_real_48b():
    cfg = ModelConfig.from_hf(REAL_48B_HF)
    inv = checkpoint_inventory(cfg)
    assert len(inv) == 20_493
    assert sum(torch.Size(s).numel() for s in inv.values()) == 49_122_681_728  # §0 parameter count
    assert inv["model.layers.0.self_attn.A_log"] == (1, 1, 32, 1)
    assert inv["model.layers.0.self_attn.q_conv1d.weight"] == (4096, 1, 4)
    assert inv["model.layers.3.self_attn.kv_b_proj.weight"] == (8192, 512)
    assert inv["model.layers.26.block_sparse_moe.experts.255.w2.weight"] == (2304, 1024)
    assert "model.layers.0.block_sparse_moe.gate.weight" not in inv and "lm_head.weight" in inv
    tied = checkpoint_inventory(ModelConfig.from_hf(dict(REAL_48B_HF, tie_word_embeddings=True)))
    assert len(tied) == 20_492 and "lm_head.weight" not in tied
    with torch.device("meta"):  # the inventory maps exactly onto the model's parameters (stacked experts)
        model = KimiLinearForCausalLM(cfg)
    slots = {n: (p, True) for n, p in model.named_parameters()} | {n: (b, False) for n, b in model.named_buffers()}
    _check_mapping(cfg, slots)


# --------------------------------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(cfg, in-memory fp32 model, checkpoint dir with 3 shards + index)."""
    cfg = ModelConfig.from_hf(CONFIGS[request.param])
    model = random_model(cfg, seed=5)
    path = save_checkpoint(model, tmp_path_factory.mktemp(request.param) / "ckpt", n_shards=3)
    return cfg, model, path


def _ids(cfg, T=24):
    return torch.randint(3, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


def test_layout_and_index(saved):
    cfg, _, path = saved
    names = sorted(p.name for p in path.iterdir())
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert names == sorted(shards + ["config.json", INDEX_FILE, SUMS_FILE])
    index = json.loads((path / INDEX_FILE).read_text())
    inv = checkpoint_inventory(cfg)
    assert set(index["weight_map"]) == set(inv) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(4 * torch.Size(s).numel() for s in inv.values())
    for f in shards:  # real names, real shapes, readable by safetensors itself
        with safe_open(str(path / f), "pt") as st:
            for k in st.keys():
                assert index["weight_map"][k] == f and tuple(st.get_slice(k).get_shape()) == inv[k]
    assert f"model.layers.{cfg.num_hidden_layers - 1}.block_sparse_moe.experts.7.w3.weight" in index["weight_map"]
    sums = dict(reversed(line.split("  ")) for line in (path / SUMS_FILE).read_text().splitlines())
    assert set(sums) == set(names) - {SUMS_FILE}
    assert ModelConfig.from_file(path) == cfg


@torch.inference_mode()
def test_load_gives_identical_logits_fp32(saved):
    cfg, model, path = saved
    loaded = load_model(path)  # config dtype is float32
    assert not loaded.training
    sd, ref = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(not t.is_meta for t in sd.values())
    ids = _ids(cfg)
    assert torch.equal(loaded(ids), model(ids))


@torch.inference_mode()
def test_load_bf16_keeps_fp32_params(saved):
    cfg, model, path = saved
    loaded = load_model(path, dtype=torch.bfloat16)
    n_fp32 = 0
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        fp32 = name.endswith(FP32_LEAVES) and ("self_attn" in name or "block_sparse_moe.gate" in name)
        assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), name
        n_fp32 += fp32
    assert n_fp32 == 2 * len(cfg.kda_layers) + 2 * sum(map(cfg.is_moe, range(cfg.num_hidden_layers)))
    torch.testing.assert_close(loaded.model.layers[0].self_attn.A_log, model.model.layers[0].self_attn.A_log,
                               rtol=0, atol=0)  # fmt: skip
    logits = loaded(_ids(cfg))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_save_bf16_single_file_and_resave_is_byte_identical(saved, tmp_path):
    cfg, model, _ = saved
    a = save_checkpoint(model, tmp_path / "a", dtype="bfloat16")
    assert sorted(p.name for p in a.iterdir()) == ["SHA256SUMS", "config.json", SINGLE_FILE]
    assert json.loads((a / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(a / SINGLE_FILE), "pt") as st:
        assert st.get_slice("model.layers.0.self_attn.A_log").get_dtype() == "F32"
        assert st.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    loaded = load_model(a)  # default dtype: config's bfloat16
    assert loaded.dtype == torch.bfloat16
    b = save_checkpoint(loaded, tmp_path / "b")  # keeps each tensor's dtype
    assert (a / SINGLE_FILE).read_bytes() == (b / SINGLE_FILE).read_bytes()
    assert (a / SUMS_FILE).read_text() == (b / SUMS_FILE).read_text()


def test_max_shard_bytes_extra_files_and_tied(tmp_path):
    cfg = ModelConfig.from_hf(dict(TINY_HF, tie_word_embeddings=True))
    model = random_model(cfg, seed=1)
    model.lm_head.weight = model.model.embed_tokens.weight
    (tmp_path / "tiktoken.model").write_text("not really a tokenizer\n")
    path = save_checkpoint(model, tmp_path / "c", max_shard_bytes=200_000, extra_files=[tmp_path / "tiktoken.model"])
    index = json.loads((path / INDEX_FILE).read_text())
    assert "lm_head.weight" not in index["weight_map"] and len(set(index["weight_map"].values())) > 3
    for f in set(index["weight_map"].values()):  # only tensors bigger than the limit get a shard alone
        assert (path / f).stat().st_size < 200_000 + 8192 or len(load_file(path / f)) == 1
    assert (path / "tiktoken.model").read_text() == "not really a tokenizer\n"
    assert verify_checkpoint(path).ok
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = _ids(cfg)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    import kimiq.model.weights as w

    cfg, model, _ = saved
    calls = []

    def dying_write(path, items):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the 2nd shard
        return real(path, items)

    real = w._write_shard
    monkeypatch.setattr(w, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "out", n_shards=3)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor the temp dir remain
    monkeypatch.setattr(w, "_write_shard", real)
    save_checkpoint(model, tmp_path / "out", n_shards=2)
    with pytest.raises(FileExistsError):
        save_checkpoint(model, tmp_path / "out", n_shards=3)
    save_checkpoint(model, tmp_path / "out", n_shards=3, overwrite=True)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 3 and len(list(tmp_path.iterdir())) == 1


def test_save_rejects_wrong_state_dict(saved, tmp_path):
    cfg, model, _ = saved
    sd = dict(model.state_dict())
    sd.pop("model.layers.0.self_attn.dt_bias")
    sd["model.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"(?s)dt_bias.*model\.extra\.weight"):
        save_checkpoint(sd, tmp_path / "x", config=cfg)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------- corruption
def _copy(saved, tmp_path) -> tuple[ModelConfig, Path, dict]:
    cfg, model, _ = saved
    path = save_checkpoint(model, tmp_path / "ckpt", n_shards=3)
    return cfg, path, json.loads((path / INDEX_FILE).read_text())["weight_map"]


def _rewrite(path: Path, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _expect(path: Path, *needles: str, strict: bool = True):
    """load_model raises CheckpointError naming every needle; verify reports the same."""
    pattern = "(?s)" + ".*".join(re.escape(n) for n in needles)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(path, strict=strict)
    rep = verify_checkpoint(path)
    assert not rep.ok and any(all(n in p for n in needles) for p in rep.problems), rep.problems


def test_missing_tensor(saved, tmp_path):
    _, path, wm = _copy(saved, tmp_path)
    name = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    _rewrite(path / wm[name], lambda t: t.pop(name))
    _expect(path, name, wm[name])


def test_unexpected_tensor(saved, tmp_path):
    _, path, wm = _copy(saved, tmp_path)
    f = wm["model.norm.weight"]
    _rewrite(path / f, lambda t: t.update({"model.layers.0.self_attn.bogus": torch.zeros(4)}))
    _expect(path, "model.layers.0.self_attn.bogus", f)
    load_model(path, strict=False)  # tolerated when not strict
    # ... also when the index names it
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.self_attn.bogus"] = f
    (path / INDEX_FILE).write_text(json.dumps(index))
    _expect(path, "model.layers.0.self_attn.bogus", f)


def test_wrong_shape(saved, tmp_path):
    cfg, path, wm = _copy(saved, tmp_path)
    name = "model.layers.0.self_attn.q_conv1d.weight"
    P, W = cfg.kda.proj_dim, cfg.kda.short_conv_kernel_size
    _rewrite(path / wm[name], lambda t: t.update({name: torch.zeros(P, W)}))
    _expect(path, name, wm[name], f"[{P}, {W}]", f"[{P}, 1, {W}]")


@pytest.mark.parametrize("where", ["mid_data", "mid_header", "tiny"])
def test_truncated_shard(saved, tmp_path, where):
    _, path, wm = _copy(saved, tmp_path)
    f = wm["model.layers.0.self_attn.q_proj.weight"]
    size, n = (path / f).stat().st_size, int.from_bytes((path / f).read_bytes()[:8], "little")
    cut = {"mid_data": (8 + n + size) // 2, "mid_header": 8 + n // 2, "tiny": 5}[where]
    os.truncate(path / f, cut)
    _expect(path, f, "truncated")
    if where == "mid_data":  # names a tensor whose data is cut
        with pytest.raises(CheckpointError, match=r"truncated: tensor 'model\.layers\."):
            load_model(path)


def test_index_points_to_missing_shard(saved, tmp_path):
    _, path, wm = _copy(saved, tmp_path)
    name = "model.embed_tokens.weight"
    (path / wm[name]).unlink()
    _expect(path, name, wm[name], "does not exist")


def test_index_names_tensor_absent_from_shard(saved, tmp_path):
    _, path, wm = _copy(saved, tmp_path)
    name = "model.norm.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[name])
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"][name] = other
    (path / INDEX_FILE).write_text(json.dumps(index))
    _expect(path, name, other, "does not contain it")


def test_non_finite_values_load(saved, tmp_path):
    _, path, wm = _copy(saved, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(path / wm[name], lambda t: t[name].fill_(float("nan")))
    assert torch.isnan(load_model(path).model.layers[0].mlp.up_proj.weight).all()


# --------------------------------------------------------------------------------------------------- verify
def test_verify_clean_and_flipped_byte(saved, tmp_path):
    cfg, path, wm = _copy(saved, tmp_path)
    rep = verify_checkpoint(path)
    assert rep.ok, rep.problems
    assert rep.n_tensors == len(checkpoint_inventory(cfg)) and rep.n_hashed == len(list(path.iterdir())) - 1
    f = path / wm["model.layers.1.self_attn.o_proj.weight"]
    data = bytearray(f.read_bytes())
    data[len(data) - 100] ^= 0x01  # in the data region: headers stay valid
    f.write_bytes(bytes(data))
    rep = verify_checkpoint(path)
    assert not rep.ok and rep.problems == [f"{f.name}: sha256 mismatch (file differs from {SUMS_FILE})"]
    assert "FAILED" in str(rep)
    load_model(path)  # the loader does not hash


def test_single_file_checkpoint_missing_tensor(saved, tmp_path):
    cfg, model, _ = saved
    path = save_checkpoint(model, tmp_path / "one")
    _rewrite(path / SINGLE_FILE, lambda t: t.pop("lm_head.weight"))
    _expect(path, "lm_head.weight", SINGLE_FILE)


# --------------------------------------------------------------------------------------------------- reference harness
def test_loads_transformers_harness_checkpoint(tmp_path):
    pytest.importorskip("transformers.models.kimi_linear")
    from tests.reference.hf_kimi import TINY, build_hf_checkpoint, build_hf_model, to_original_state_dict

    path = build_hf_checkpoint(TINY, tmp_path / "hf", seed=2, n_shards=3)
    assert verify_checkpoint(path).ok
    model = load_model(path)
    ref = to_original_state_dict(build_hf_model(TINY, seed=2), TINY)
    mine = {}
    for k, t in model.state_dict().items():
        if k.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
            mine.update({f"{k[:-3]}.{e}.{k[-2:]}.weight": t[e] for e in range(t.shape[0])})
        else:
            mine[k] = t
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
