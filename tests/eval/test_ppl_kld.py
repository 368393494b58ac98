"""Windows, perplexity and KL divergence through real model calls (tiny random models; the default model
for one small perplexity run)."""

from __future__ import annotations

import math

import pytest
import torch

from kimiq.config import ModelConfig
from kimiq.eval.kld import BaseLogits, base_logits, kld_vs_model, kld_vs_saved
from kimiq.eval.ppl import Windows, perplexity, window_logprobs
from tests.conftest import random_model


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig.tiny()
    base = random_model(cfg, seed=0)
    noisy = random_model(cfg, seed=0)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(3))
    return base, noisy, tokens


def test_windows_count_scored_positions():
    w = Windows.over(1000, ctx=64, score="second-half")
    assert (w.n, w.first, w.per_window, w.n_scored, w.n_tokens) == (15, 32, 31, 465, 960)
    assert Windows.over(1000, 512).per_window == 255  # llama.cpp's 255 at -c 512
    assert Windows.over(1000, 64, "all", limit_tokens=130).n_scored == 2 * 63
    with pytest.raises(ValueError):
        Windows.over(50, 64)
    with pytest.raises(ValueError):
        Windows(64, "half", 1)


def test_window_logprobs_are_fresh_state_full_forwards(models):
    model, _, tokens = models
    w = Windows.over(100, 48, "second-half")
    pieces = list(window_logprobs(model, tokens, w, chunk=16))  # second half straddles pieces
    assert len(pieces) == w.n
    for i, (lp, tgt) in enumerate(pieces):
        ids = tokens[i * 48 : (i + 1) * 48]
        with torch.no_grad():
            ref = torch.log_softmax(model(ids[None, :-1])[0], -1)[w.first :]
        assert torch.allclose(lp, ref, atol=1e-4)
        assert torch.equal(tgt, ids[w.first + 1 :])


def test_perplexity_default_model_second_half_and_all():
    from kimiq import load

    model, tok = load(None, dtype=torch.float32)
    half = perplexity(model, tok, ctx=64, limit_tokens=128)
    assert half.nll.numel() == 2 * 31 == half.report.n_tokens and half.report.n_windows == 2
    assert math.isfinite(half.report.ppl) and 1 < half.report.ppl < 200
    assert half.report.ppl_se > 0 and "PPL = " in str(half.report)
    full = perplexity(model, tok, ctx=64, limit_tokens=128, score="all")
    assert full.nll.numel() == 2 * 63
    # the second-half positions are the same predictions in both runs
    assert torch.allclose(full.nll.view(2, 63)[:, 32:], half.nll.view(2, 31), atol=1e-4)
    text = perplexity(model, tok, "def f(x):\n    return x + 1\n" * 20, ctx=32)
    assert text.report.n_windows >= 2


def test_model_against_itself_is_zero(models):
    model, _, tokens = models
    w = Windows.over(len(tokens), 50)
    res = kld_vs_model(model, model, tokens, w)
    assert res.kld.abs().max() < 1e-6 and res.report.flip_rate == 0 and res.report.n == w.n_scored
    saved = kld_vs_saved(model, base_logits(model, tokens, w, k=0))
    assert saved.kld.abs().max() < 1e-6 and saved.report.n_flips == 0
    assert torch.equal(saved.nll, saved.nll_base)


def test_saved_base_matches_on_the_fly_and_round_trips(models, tmp_path):
    base, noisy, tokens = models
    w = Windows.over(len(tokens), 50, "all")
    exact = kld_vs_model(noisy, base, tokens, w, save_k=0)
    assert exact.report.kld_mean > 1e-4 and exact.base is not None
    path = tmp_path / "base.safetensors"
    exact.base.save(path)
    loaded = BaseLogits.load(path)
    assert loaded.windows == w and loaded.k == base.config.vocab_size and loaded.ids is None
    again = kld_vs_saved(noisy, loaded)
    assert torch.allclose(again.kld, exact.kld, atol=1e-6)
    assert again.report.same_top == exact.report.same_top
    assert again.report.ppl == pytest.approx(exact.report.ppl, rel=1e-5)
    assert again.report.ppl_base == pytest.approx(exact.report.ppl_base, rel=1e-5)
    # top-k: a lower bound that tightens with k
    v = base.config.vocab_size
    top_small = kld_vs_saved(noisy, base_logits(base, tokens, w, k=16)).report.kld_mean
    top_large = kld_vs_saved(noisy, base_logits(base, tokens, w, k=v - 50)).report.kld_mean
    assert top_small < top_large <= exact.report.kld_mean * (1 + 1e-6)
    assert top_large == pytest.approx(exact.report.kld_mean, rel=0.05)
    loaded.check(tokens, w, n_vocab=v)
    with pytest.raises(ValueError, match="different tokens"):
        loaded.check(tokens.flip(0), w)
    with pytest.raises(ValueError, match="saved for"):
        loaded.check(tokens, Windows.over(len(tokens), 40, "all"))
