"""Quantized checkpoints: disk == memory (logits identical), verify, atomic writes, bad input, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kimiq import default_model_path, load
from kimiq.cli import main
from kimiq.model.weights import CheckpointError, load_model, save_checkpoint, verify_checkpoint
from kimiq.quant import formats as formats_mod
from kimiq.quant.checkpoint import quantize_checkpoint
from kimiq.quant.modules import _cpu_path, QuantEmbedding, QuantExperts, QuantLinear, quantize
from kimiq.config import ModelConfig
from tests.conftest import TWO_MLA_TWO_DENSE_HF, random_model

IDS = torch.tensor([[3, 17, 99, 250, 7, 1000, 42, 5, 300, 11, 64, 2]])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random bf16 checkpoint whose widths are not multiples of 256 (fallbacks get exercised)."""
    cfg = ModelConfig.from_hf(dict(TWO_MLA_TWO_DENSE_HF, dtype="bfloat16"))
    model = random_model(cfg, seed=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny") / "ckpt", dtype=torch.bfloat16)


@pytest.mark.parametrize("recipe", ["q4_k_m", "mxfp4-g32", "mixed-3.6", "mxfp4_moe"])
def test_disk_equals_memory(tiny_ckpt, tmp_path, recipe):
    out = quantize_checkpoint(tiny_ckpt, recipe, tmp_path / "q", progress=False, log=lambda s: None)
    assert verify_checkpoint(out).ok
    disk = load_model(out)
    mem = quantize(load_model(tiny_ckpt), recipe)
    ids = IDS % disk.config.vocab_size
    with torch.no_grad():
        a, b = disk(ids), mem(ids)
    assert torch.equal(a, b)
    assert disk.quantization_plan["formats"] == mem.quantization_plan["formats"]
    kinds = {type(m) for m in disk.modules()}
    assert {QuantLinear, QuantExperts} <= kinds
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "kimiq" and qc["recipe"] == recipe


def test_default_model_q4_k_m(tmp_path):
    """The embedded model through the CLI: a smaller checkpoint, close logits, identical after reload."""
    assert main(["quantize", "-r", "q4_k_m", "-o", str(tmp_path / "q4")]) == 0
    q, tok = load(tmp_path / "q4")
    ref, _ = load()
    mem = quantize(load()[0], "q4_k_m")
    assert isinstance(q.model.embed_tokens, QuantEmbedding) and isinstance(q.lm_head, QuantLinear)
    ids = torch.tensor([tok.encode("def read_file(path):\n    with open(path) as f:\n        return f.read()\n")])
    with torch.no_grad():
        lq, lm, lr = q(ids), mem(ids), ref(ids)
    assert torch.equal(lq, lm)
    kl = (lr.log_softmax(-1).exp() * (lr.log_softmax(-1) - lq.log_softmax(-1))).sum(-1).mean()
    print(f"KL(bf16 || q4_k_m) = {float(kl):.4f} nats/token")
    assert float(kl) < 0.02  # measured 0.0029 on the shipped default model (2026-11-30)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "q4") < 0.4 * size(default_model_path())


def test_killed_run_leaves_nothing_and_rerun_works(tiny_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = formats_mod.Format.quantize

    def dying(self, w, imatrix=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if killed mid-way
        return real(self, w, imatrix)

    monkeypatch.setattr(formats_mod.Format, "quantize", dying)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_ckpt, "q4_k_m", tmp_path / "q", progress=False, log=lambda s: None)
    assert not (tmp_path / "q").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(formats_mod.Format, "quantize", real)
    # a hard kill leaves a temp dir behind: it never loads, and the next run removes it
    stale = tmp_path / ".q.tmp-999999999-deadbeef"
    stale.mkdir()
    out = quantize_checkpoint(tiny_ckpt, "q4_k_m", tmp_path / "q", progress=False, log=lambda s: None)
    assert verify_checkpoint(out).ok and not stale.exists()
    with pytest.raises(FileExistsError):
        quantize_checkpoint(tiny_ckpt, "q4_k_m", out, progress=False, log=lambda s: None)


def test_corruption_is_named(tiny_ckpt, tmp_path):
    out = quantize_checkpoint(tiny_ckpt, "q8_0", tmp_path / "q", progress=False, log=lambda s: None)
    conf = json.loads((out / "config.json").read_text())
    name = next(iter(conf["quantization_config"]["formats"]))
    conf["quantization_config"]["formats"][name] = "q4_k"  # config disagrees with the stored layout
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(out)
    rep = verify_checkpoint(out)
    assert not rep.ok and any("config.json: sha256 mismatch" in p for p in rep.problems)
    with pytest.raises(CheckpointError, match="already quantized"):
        conf["quantization_config"]["formats"][name] = "q8_0"
        (out / "config.json").write_text(json.dumps(conf))
        quantize_checkpoint(out, "q4_k_m", tmp_path / "again", progress=False)


def test_cli_list_and_errors(capsys):
    assert main(["quantize", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("q4_k_m", "q5_k_m", "q3_k_s", "q2_k", "mxfp4_moe", "mxfp4-g32", "affine4-g64", "mixed-3.6"):
        assert name in text
    assert "bpw" in text and "q6_k" in text
    assert main(["quantize", "-r", "nope", "-o", "/tmp/never"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "affine4-g32", "affine4-g64", "affine4-g128"])
def test_fast_int4_linear_matches_reference(fmt):
    """The CPU kernel path (torch's packed int4 kernel, or Q4_K's int8 one on VNNI builds) == dequantize-then-matmul,
    within the activation rounding (bf16, or int8 per 256 values as llama.cpp's Q8_K)."""
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    m = QuantLinear(fmt, 512, 128, formats_mod.get_format(fmt).quantize(w.bfloat16()))
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2))
    m.use_fast = False
    ref = m(x)
    m.use_fast = True
    for dt in (torch.float32, torch.bfloat16):
        y = m(x.to(dt))
        assert y.dtype == dt and y.shape == (2, 3, 128)
        assert bool(m._int4) == (_cpu_path(6, fmt, dt) == "int4")  # Q4_K with VNNI: its int8 kernel instead
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_fast_int4_experts_match_reference():
    cfg = ModelConfig.from_hf(dict(TWO_MLA_TWO_DENSE_HF, hidden_size=256, moe_intermediate_size=128))
    model = quantize(random_model(cfg, seed=6), "q4_k_m")
    ids = IDS % cfg.vocab_size
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    with torch.no_grad():
        for m in experts:
            m.use_fast = False
        ref = model(ids)
        for m in experts:
            m.use_fast = True
        fast = model(ids)
    if _cpu_path(1, "q4_k", torch.float32) == "int4":
        assert any(p for m in experts for p in m._int4.values())  # the kernel path really ran
    else:  # VNNI builds: Q4_K's int8 kernel, no repack
        assert all(m._fused and not m._int4 for m in experts)
    assert float((fast - ref).abs().max() / ref.abs().max()) < 2e-2
