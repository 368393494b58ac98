"""Smoke runs of the benchmark scripts at toy sizes (their figures come from full runs; these keep them running)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_long_context_with_a_bf16_cache(capsys):
    """Two small contexts, eager: the table has a row per context, a bf16 cache of 2 layers x 288 x 2 B a token, and
    the read-bandwidth columns (bound = the first context's step + this context's cache read time)."""
    _script("long_context").main(["--modes", "eager", "--contexts", "64", "4096", "--prefill", "32", "--gen", "2",
                                  "--reps", "1", "--cache-dtype", "bf16"])
    out = capsys.readouterr().out
    assert "cache bfloat16" in out and "1152 B of cache per token" in out and "read bandwidth" in out
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines()
            if ln.startswith("| 64 |") or ln.startswith("| 4,096 |")]
    assert len(rows) == 2 and rows[0][3] == "1.00x"
    first, read, bound = float(rows[0][2]), float(rows[1][5]), float(rows[1][6])
    assert read > 0 and abs(bound - (first + read)) <= 0.011
