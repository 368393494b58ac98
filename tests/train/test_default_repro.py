"""Slow: re-running ``kimiq train --preset default`` from scratch reproduces the shipped model's first logged
losses exactly (same torch build and CPU kind; float summation order differs across CPU ISAs)."""

from __future__ import annotations

import json

import pytest

from kimiq import default_model_path
from kimiq.train.trainer import PRESETS, run_training


@pytest.mark.slow
def test_default_preset_first_losses(tmp_path):
    info = json.loads((default_model_path() / "config.json").read_text())["kimiq"]
    first = info["first_losses"]
    res = run_training(PRESETS["default"], tmp_path, None, steps=len(first), log=lambda *_: None)
    assert [round(x, 6) for x in res["losses"]] == first
