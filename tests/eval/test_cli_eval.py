"""``kimiq eval ppl | kld | compare`` end to end on the default model and a Q8_0 build (tiny token budgets)."""

from __future__ import annotations

import csv

import pytest

from kimiq import default_model_path
from kimiq.cli import main

WINDOWS = ["--ctx", "64", "--limit-tokens", "128"]  # 2 windows, 31 scored tokens each


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    from kimiq.quant.checkpoint import quantize_checkpoint

    out = tmp_path_factory.mktemp("builds") / "q8_0"
    quantize_checkpoint(default_model_path(), "q8_0", out)
    return out


def test_eval_ppl(capsys):
    assert main(["eval", "ppl", *WINDOWS]) == 0
    out = capsys.readouterr().out
    assert "PPL = " in out and "62 tokens scored in 2 windows of 64, second-half" in out


def test_eval_kld_save_then_reuse(q8, tmp_path, capsys):
    f = tmp_path / "base.safetensors"
    args = ["eval", "kld", "-m", str(q8)]
    assert main([*args, "--base", str(default_model_path()), "--save-base-logits", str(f), *WINDOWS]) == 0
    first = capsys.readouterr().out
    assert f.exists() and "Mean    KLD" in first and "(62 positions)" in first
    assert main([*args, "--base-logits", str(f), "--json", str(tmp_path / "r.json")]) == 0
    again = capsys.readouterr().out
    kld_line = next(line for line in first.splitlines() if line.startswith("Mean    KLD"))
    assert kld_line in again  # exact base saved: the same KL
    assert (tmp_path / "r.json").exists()
    assert main([*args, "--base-logits", str(f), "--ctx", "32"]) == 2  # windows differ from the saved ones
    assert "saved for" in capsys.readouterr().err


def test_eval_compare_writes_md_csv_png(q8, tmp_path, capsys):
    md, cs, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.png"
    argv = ["eval", "compare", str(default_model_path()), str(q8), *WINDOWS, "--md", str(md), "--csv", str(cs),
            "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| default | bfloat16 |" in out and "| q8_0 | q8_0 |" in out
    assert [line.split(" | ")[0] for line in md.read_text().splitlines() if line.startswith("| ")] == [
        "| build", "| default", "| q8_0"]
    rows = list(csv.DictReader(cs.open()))
    assert [r["label"] for r in rows] == ["default", "q8_0"]
    assert float(rows[0]["kld_mean"]) == 0 and 0 < float(rows[1]["kld_mean"]) < 0.05
    assert 8 < float(rows[1]["bpw"]) < 9 and float(rows[0]["bpw"]) > 15
    assert int(rows[1]["size_bytes"]) < int(rows[0]["size_bytes"])
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
