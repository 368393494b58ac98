"""The embedded default model: ships in the real layout, verifies, loads like any checkpoint, writes Python."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from kimiq import default_model_path, load
from kimiq.cli import main
from kimiq.generate import SamplingParams, generate_text
from kimiq.model.weights import verify_checkpoint
from kimiq.train.trainer import PRESETS

PATH = default_model_path()


def test_layout_size_and_verify():
    names = {p.name for p in PATH.iterdir()}
    assert {"config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "SHA256SUMS"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert sum(p.stat().st_size for p in PATH.iterdir()) <= 32 * 2**20
    rep = verify_checkpoint(PATH)
    assert rep.ok, str(rep)


def test_architecture_is_kimi_linear_scaled_down():
    cfg = json.loads((PATH / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("kimiq", "torch_dtype", "dtype")} == {
        k: v for k, v in PRESETS["default"].hf_config().items() if k not in ("torch_dtype", "dtype")}
    model, tok = load()
    c = model.config
    assert c.layer_types.count("mla") >= 2 and c.layer_types.count("kda") == 3 * c.layer_types.count("mla")
    assert not c.is_moe(0) and all(c.is_moe(i) for i in range(1, c.num_hidden_layers))
    assert c.vocab_size == tok.vocab_size
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == c.num_hidden_layers - 1 and all(b.std() > 0 for b in biases)  # learned, not zeros
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def _parses(program: str) -> bool:
    if program.rstrip().endswith(":"):  # a block opener as the last line: give it a body
        last = program.rstrip().rsplit("\n", 1)[-1]
        program = program.rstrip() + "\n" + " " * (len(last) - len(last.lstrip()) + 4) + "pass\n"
    try:
        ast.parse(program)
        return True
    except SyntaxError:
        return False


_WEAK = pytest.mark.xfail(strict=True, reason="the 15M-parameter default model (1,900 CPU steps) falls into greedy "
                          "repetition on this prompt within 48 tokens (`self._is_index(n, n, n, ...`); see issue 3's "
                          "note.  (fibonacci's continuation also repeated until decode summed a token's experts in "
                          "a fixed order, 2026-12-01: greedy text is that sensitive to rounding.)")


@pytest.mark.parametrize("prompt", ["def fibonacci(n):\n",
                                    pytest.param("def is_even(n):\n", marks=_WEAK), "def read_file(path):\n",
                                    "class Stack:\n    def push(self, item):\n"])
def test_greedy_continuation_starts_valid_python(prompt):
    """The greedy continuation begins with a body that parses: some prefix of it, ending at a line boundary
    and holding at least one non-blank generated line, makes ``prompt + prefix`` valid Python.  (Weaker than
    "the whole output parses": this 15M-parameter model drifts into invalid code after a few lines.)"""
    # fp32, as the CLI runs it on CPU: the checkpoint's bf16 logits tie exactly at some steps (fibonacci's 20th token:
    # margin 0), and which token wins a tie depends on the CPU's bf16 kernels (an Intel Xeon without AVX512-BF16
    # continued into invalid code where an AMD Zen4 did not); fp32 margins there are >= 0.05
    model, tok = load(dtype=torch.float32)
    out = "".join(generate_text(model, tok, prompt, SamplingParams(), 48))
    lines = out.split("\n")
    ok = [k for k in range(1, len(lines) + 1)
          if any(ln.strip() for ln in lines[:k]) and _parses(prompt + "\n".join(lines[:k]) + "\n")]
    assert ok, repr(prompt + out)
    with pytest.raises(SyntaxError):  # not vacuous: the prompt alone has no body
        ast.parse(prompt)


def test_cli_generate_without_model(capsys):
    assert main(["generate", "-p", "def fibonacci(n):", "-n", "24"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("def fibonacci(n):") and len(cap.out) > 30 and "tok/s" in cap.err


def test_cli_chat_one_turn(capsys):
    assert main(["chat", "-p", "Write a Python function `add(a, b)`: Return the sum of a and b.", "-n", "48"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.split("\n", 1)[1].strip()) > 0
