"""``kimiq train --preset smoke``: seeded runs reproduce their losses exactly; a resumed run equals a straight one."""

from __future__ import annotations

import shutil

import pytest
import torch

from kimiq.cli import main
from kimiq.model.weights import load_model, verify_checkpoint
from kimiq.train.trainer import PRESETS, _lr, run_training, train_tokenizer

SMOKE = PRESETS["smoke"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    work = tmp_path_factory.mktemp("a")
    res = run_training(SMOKE, work, work / "model", log=lambda *_: None)
    return work, res


def test_tokenizer_rebuild_is_identical(straight, tmp_path):
    work, _ = straight
    train_tokenizer(SMOKE, tmp_path / "tok", log=lambda *_: None)
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "tok" / f).read_bytes() == (work / "tokenizer" / f).read_bytes()


def test_rerun_and_resume_reproduce_losses_exactly(straight, tmp_path):
    work, res = straight
    assert len(res["losses"]) == SMOKE.steps >= 200
    assert res["losses"][-1] < res["losses"][0] - 1.0  # it learns
    # A second run from scratch (tokenizer and token caches reused: rebuilt identically, see above),
    # stopped half-way through the CLI, then resumed.
    b = tmp_path / "b"
    b.mkdir()
    for f in ("tokenizer", "train.npy", "validation.npy"):
        src = work / f
        shutil.copytree(src, b / f) if src.is_dir() else shutil.copy(src, b / f)
    assert main(["train", "--preset", "smoke", "--work-dir", str(b), "--steps", "100"]) == 0
    assert not (b / "model").exists()  # not finished: nothing exported
    half = torch.load(b / "ckpt.pt", weights_only=False)
    assert half["step"] == 100 and half["losses"] == res["losses"][:100]
    again = run_training(SMOKE, b, b / "model", log=lambda *_: None)
    assert again["losses"] == res["losses"]


def test_export_loads_and_verifies(straight):
    work, _ = straight
    out = work / "model"
    assert verify_checkpoint(out).ok
    model = load_model(out)
    assert model.config.vocab_size == SMOKE.vocab_size
    biases = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # learned the aux-loss-free way
    assert all(b.dtype == torch.float32 for b in biases)


def test_lr_schedule():
    assert _lr(SMOKE, 0) == pytest.approx(SMOKE.lr / SMOKE.warmup)
    assert _lr(SMOKE, SMOKE.warmup - 1) == pytest.approx(SMOKE.lr)
    assert _lr(SMOKE, SMOKE.steps) == pytest.approx(SMOKE.lr * SMOKE.min_lr_ratio)
