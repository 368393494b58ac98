"""Imports stay lean and free of side effects: no kernels, no reference libraries, no device probing."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cli_import_does_not_load_torch():
    assert "torch" not in _modules_after("import kimiq, kimiq.cli")


def test_engine_import_loads_no_kernels_or_references():
    mods = _modules_after("import kimiq.model.model, kimiq.model.weights, kimiq.generate, kimiq.tokenizer")
    for name in ("transformers", "fla", "triton", "regex", "kimiq.ops.kda_fla"):
        assert name not in mods, name
