"""kimiq.eval.metrics against hand-computed values (plain math on tiny logits) and llama.cpp's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from kimiq.eval.metrics import (
    kl_divergence,
    kl_divergence_topk,
    kld_report,
    mean_and_uncertainty,
    percentile,
    perplexity_and_se,
    token_nll,
    top2_gap,
    topk_summary,
)

BASE = [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 0.5]]  # logits, 3 positions x vocab 3
MODEL = [[1.5, 1.2, 0.1], [0.2, 0.0, 0.9], [3.0, 1.0, 0.5]]
TARGETS = [0, 2, 1]


def _softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def _lp(rows):
    return torch.log_softmax(torch.tensor(rows, dtype=torch.float64), -1)


def test_nll_ppl_and_kl_by_hand():
    nll = token_nll(_lp(MODEL), torch.tensor(TARGETS))
    want = [-math.log(_softmax(r)[t]) for r, t in zip(MODEL, TARGETS)]
    assert nll.tolist() == pytest.approx(want, rel=1e-12)
    ppl, se = perplexity_and_se(nll)
    assert ppl == pytest.approx(math.exp(sum(want) / 3), rel=1e-12)
    assert se == 0.0  # llama.cpp reports no uncertainty for N <= 10
    kl = kl_divergence(_lp(BASE), _lp(MODEL))
    for t in range(3):
        p, q = _softmax(BASE[t]), _softmax(MODEL[t])
        assert float(kl[t]) == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-10)
    assert (kl > 0).all()


def test_uncertainty_is_llama_cpp_delta_method():
    x = [0.5, 1.25, 2.0, 0.75, 3.5, 1.0, 0.25, 2.5, 1.75, 0.5, 4.0, 1.5]  # N = 12 > 10
    n = len(x)
    mean = sum(x) / n
    unc = math.sqrt((sum(v * v for v in x) / n - mean * mean) / (n - 1))
    assert mean_and_uncertainty(torch.tensor(x)) == pytest.approx((mean, unc), rel=1e-12)
    ppl, se = perplexity_and_se(torch.tensor(x))
    assert (ppl, se) == pytest.approx((math.exp(mean), math.exp(mean) * unc), rel=1e-12)
    assert mean_and_uncertainty(torch.tensor(x[:10]))[1] == 0.0
    assert mean_and_uncertainty(torch.full((20,), 0.3))[1] == 0.0  # no variance


def test_percentile_interpolates_like_llama_cpp():
    x = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert percentile(x, 0.5) == pytest.approx(2.5)  # mean of the two middle values
    assert percentile(x, 0.9) == pytest.approx(3.7)  # p = 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(x, 1.0) == 4.0 and percentile(x, 0.0) == 1.0


def test_self_kl_is_zero_and_no_flips():
    lp = torch.log_softmax(torch.randn(50, 40, generator=torch.Generator().manual_seed(0)), -1)
    tgt = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(1))
    kl = kl_divergence(lp, lp)
    assert torch.equal(kl, torch.zeros(50, dtype=kl.dtype))
    nll = token_nll(lp, tgt)
    rep = kld_report(kl, nll, nll, lp.argmax(-1) == lp.argmax(-1), top2_gap(lp.topk(2).values))
    assert rep.kld_mean == 0 and rep.kld_max == 0 and rep.flip_rate == 0 and rep.n_flips == 0
    assert rep.ratio == pytest.approx(1.0) and rep.ln_ratio_se == pytest.approx(0.0, abs=1e-7)
    assert rep.rms_dp == 0 and rep.cor_ln_ppl == pytest.approx(1.0)
    assert math.isnan(rep.kld_flipped_mean) and math.isnan(rep.near_tie_share)
    d = rep.to_dict()
    assert d["flip_rate"] == 0 and d["n"] == 50
    assert "Mean    KLD" in str(rep) and "Same top p" in str(rep) and "RMS Δp" in str(rep)


def test_report_flips_near_ties_and_rms_dp_by_hand():
    lp_b, lp_m = _lp(BASE), _lp(MODEL)
    tgt = torch.tensor(TARGETS)
    kl = kl_divergence(lp_b, lp_m)
    same = lp_m.argmax(-1) == lp_b.argmax(-1)  # positions 0, 1 agree; 2 flips (base 1, model 0)
    gap = top2_gap(lp_b.topk(2).values)
    rep = kld_report(kl, token_nll(lp_m, tgt), token_nll(lp_b, tgt), same, gap, near_tie=0.5)
    assert same.tolist() == [True, True, False]
    assert rep.n_flips == 1 and rep.flip_rate == pytest.approx(1 / 3)
    assert rep.same_top_se == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert rep.kld_flipped_mean == pytest.approx(float(kl[2]))
    p3 = sorted(_softmax(BASE[2]), reverse=True)
    assert float(gap[2]) == pytest.approx(p3[0] - p3[1])
    assert rep.near_tie_share == (1.0 if p3[0] - p3[1] < 0.5 else 0.0)
    dp = [_softmax(m)[t] - _softmax(b)[t] for m, b, t in zip(MODEL, BASE, TARGETS)]
    assert rep.rms_dp == pytest.approx(math.sqrt(sum(d * d for d in dp) / 3), rel=1e-9)
    assert rep.dp_mean == pytest.approx(sum(dp) / 3, rel=1e-9)
    assert rep.kld_mean == pytest.approx(float(kl.mean()))
    nll_m = [-math.log(_softmax(m)[t]) for m, t in zip(MODEL, TARGETS)]
    nll_b = [-math.log(_softmax(b)[t]) for b, t in zip(BASE, TARGETS)]
    assert rep.ln_ratio == pytest.approx((sum(nll_m) - sum(nll_b)) / 3, rel=1e-9)
    assert rep.ppl_base == pytest.approx(math.exp(sum(nll_b) / 3), rel=1e-9)


def test_topk_kl_exact_at_full_vocab_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(2)
    base = torch.log_softmax(2 * torch.randn(64, 200, generator=g), -1)
    model = torch.log_softmax(base + 0.3 * torch.randn(64, 200, generator=g), -1)
    exact = kl_divergence(base, model)
    top, ids, rest = topk_summary(base, 200)
    assert torch.isinf(rest).all()
    assert torch.allclose(kl_divergence_topk(top, ids, rest, model), exact, rtol=1e-5, atol=1e-7)
    prev = torch.zeros_like(exact)
    for k in (1, 20, 100, 190):
        approx = kl_divergence_topk(*topk_summary(base, k), model)
        assert (approx >= -1e-6).all() and (approx <= exact + 1e-6).all()  # merging outcomes lowers KL
        assert (approx >= prev - 1e-6).all()  # finer partitions, larger KL
        prev = approx
    assert float(prev.mean()) == pytest.approx(float(exact.mean()), rel=0.02)
    # the rest is logsumexp of the dropped entries, kept exactly even when tiny
    top, ids, rest = topk_summary(base, 199)
    dropped = base.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)
    assert torch.allclose(rest, dropped.float())
