"""Held-out bits per byte: streamed scoring equals one full forward; segments equal fresh-state forwards."""

from __future__ import annotations

import lzma
import math

import pytest
import torch

from kimiq.config import ModelConfig
from kimiq.eval.bpb import heldout_bpb, model_bits, xz_bits
from kimiq.tokenizer import Tokenizer, write_tokenizer_files
from tests.conftest import random_model
from tests.test_tokenizer import CORPUS, train_bpe

TEXT = CORPUS[:1500]


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    tok = Tokenizer.from_dir(write_tokenizer_files(tmp_path_factory.mktemp("tok"), train_bpe(CORPUS, 200)))
    return random_model(ModelConfig.tiny()), tok


def _nll_bits(model, x: torch.Tensor, y: torch.Tensor) -> float:
    lp = torch.log_softmax(model(x)[0], -1).gather(1, y[:, None])
    return -lp.sum().item() / math.log(2)


def test_streamed_equals_full_forward(mt):
    model, tok = mt
    ids = torch.tensor([[tok.token_to_id("[EOS]"), *tok.encode(TEXT)]])
    with torch.no_grad():
        ref = _nll_bits(model, ids[:, :-1], ids[0, 1:])
    for window in (37, 128, 10_000):
        bits, n = model_bits(model, tok, TEXT, window=window)
        assert n == ids.shape[1] - 1
        assert bits == pytest.approx(ref, rel=1e-5)


def test_max_context_equals_fresh_state_segments(mt):
    model, tok = mt
    ids = torch.tensor([[tok.token_to_id("[EOS]"), *tok.encode(TEXT)]])
    T, seg = ids.shape[1] - 1, 150
    with torch.no_grad():
        ref = sum(_nll_bits(model, ids[:, a : min(a + seg, T)], ids[0, a + 1 : min(a + seg, T) + 1])
                  for a in range(0, T, seg))
    bits, _ = model_bits(model, tok, TEXT, window=64, max_context=seg)
    assert bits == pytest.approx(ref, rel=1e-5)
    assert bits != pytest.approx(model_bits(model, tok, TEXT)[0], rel=1e-4)  # context matters


def test_report_and_xz(mt):
    model, tok = mt
    files = [("a.py", TEXT), ("b.py", "def f(x):\n    return x + 1\n" * 20)]
    rep = heldout_bpb(model, tok, files)
    data = (TEXT + files[1][1]).encode()
    assert rep.n_bytes == len(data) and rep.n_files == 2
    assert rep.xz_concat_bits == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    assert rep.xz_per_file_bits == sum(xz_bits(t.encode()) for _, t in files)
    assert rep.model_bits == pytest.approx(sum(model_bits(model, tok, t)[0] for _, t in files), rel=1e-9)
    assert rep.model_bpb > rep.xz_concat_bpb  # a random model is worse than xz
    assert "xz -9e concat" in str(rep)
