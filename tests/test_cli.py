"""The ``kimiq`` console script end to end on a saved random checkpoint with a synthetic tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimiq.cli import main
from kimiq.model.weights import save_checkpoint
from kimiq.config import ModelConfig
from kimiq.tokenizer import builtin_chat_template, write_tokenizer_files
from tests.conftest import random_model
from tests.test_tokenizer import CORPUS, train_bpe


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok_dir = write_tokenizer_files(tmp_path_factory.mktemp("tok"), train_bpe(CORPUS, 200),
                                    chat_template=builtin_chat_template())
    extra = [tok_dir / f for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")]
    cfg = ModelConfig.tiny()  # vocab 1000 >= 456 BPE + 256 special
    return save_checkpoint(random_model(cfg), tmp_path_factory.mktemp("ck") / "m", n_shards=3, extra_files=extra)


def test_generate_greedy_is_deterministic(ckpt, capsys):
    outs = []
    for _ in range(2):
        assert main(["generate", "-m", str(ckpt), "-p", "def f(x):", "-n", "12"]) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "tok/s" in cap.err and "finish: length" in cap.err
    assert outs[0] == outs[1] and outs[0].startswith("def f(x):")


def test_generate_with_a_bf16_cache(ckpt, capsys, monkeypatch):
    """--cache-dtype bf16: the states generation makes hold bf16 latent caches (the model itself stays fp32)."""
    from kimiq.model.model import KimiLinearForCausalLM
    from kimiq.model.state import MLAState

    seen, new_state = [], KimiLinearForCausalLM.new_state

    def spy(self, *a, **k):
        st = new_state(self, *a, **k)
        seen.extend((self.dtype, s.latent.dtype) for s in st.layers if isinstance(s, MLAState))
        return st

    monkeypatch.setattr(KimiLinearForCausalLM, "new_state", spy)
    assert main(["generate", "-m", str(ckpt), "-p", "def f(x):", "-n", "8", "--cache-dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}


def test_generate_sampling_seeded_and_stop_string(ckpt, capsys):
    args = ["generate", "-m", str(ckpt), "-p", "Hello", "-n", "16", "-t", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == a


def test_chat_two_turns(ckpt, capsys):
    assert main(["chat", "-m", str(ckpt), "-p", "hi", "-p", "and again", "-n", "8"]) == 0
    cap = capsys.readouterr()
    assert ">>> hi" in cap.out and ">>> and again" in cap.out
    assert cap.err.count("[prefill") == 2 and "prefill 1 tok" not in cap.err


def test_verify_ok_then_flipped_byte(ckpt, tmp_path, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(ckpt, d)
    assert main(["verify", str(d)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x80
    shard.write_bytes(bytes(data))
    assert main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert shard.name in out and "sha256 mismatch" in out


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "nope"), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimiq generate: error:") and "nope" in err


def test_console_script_help():
    exe = Path(sys.executable).with_name("kimiq")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kimiq.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("generate", "chat", "verify"):
        assert sub in out
