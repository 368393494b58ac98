"""Sampling: parameter validation, penalty math, filters, seeded reproducibility (pure CPU, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from kimiq.generate.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """n samples from one row of logits (as n identical rows: one batched call)."""
    return sample(logits.expand(n, -1), params, make_generator(seed))


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log().unsqueeze(0)  # [1, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1), dict(temperature=math.inf), dict(temperature=math.nan),
        dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.0), dict(top_k=True),
        dict(min_p=-0.1), dict(min_p=1.1), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
        dict(repetition_window=-1), dict(repetition_window=1.5), dict(seed=-1), dict(seed=1.0),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_params_frozen_and_defaults():
    p = SamplingParams()
    assert p.greedy and p.top_p == 1 and p.top_k == 0 and p.min_p == 0 and p.repetition_penalty == 1.0
    assert p.repetition_window == 64 and p.seed is None
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


def test_repetition_penalty_hand_example():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    # token 1 appears twice but is penalised once; positives divided, negatives multiplied, 0 stays 0
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], penalty=2.0, window=0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]))
    assert logits[0] == 2.0  # input untouched
    # window=2 only sees the last two ids (1, 4)
    out = apply_repetition_penalty(logits, [0, 3, 1, 4], penalty=2.0, window=2)
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.5, 3.0, 0.0]))
    # penalty < 1 rewards repeats
    out = apply_repetition_penalty(logits, [0, 1], penalty=0.5, window=0)
    torch.testing.assert_close(out, torch.tensor([4.0, -0.5, 0.5, 3.0, 0.0]))


def test_repetition_penalty_batched_rows():
    logits = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    out = apply_repetition_penalty(logits, [[2], [0, 1]], penalty=4.0, window=64)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.25], [-4.0, -4.0, -1.0]]))
    with pytest.raises(ValueError, match="rows"):
        apply_repetition_penalty(logits, [[0]], penalty=2.0)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample(logits, SamplingParams()).item() == 0
    p = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, p, history=[[0, 0]]).item() == 1  # 3/2 = 1.5 < 2


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample(logits, SamplingParams()), logits.argmax(-1))


def test_sampling_needs_explicit_generator():
    with pytest.raises(ValueError, match="Generator"):
        sample(LOGITS, SamplingParams(temperature=1.0))


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 1000)  # uniform: draws differ between seeds with overwhelming probability
    p = SamplingParams(temperature=1.0)
    a, b, c = (_draws(logits, p, n=64, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    _draws(torch.zeros(1, 50), SamplingParams(temperature=1.0), n=10)
    make_generator(None)
    assert torch.equal(state, torch.get_rng_state())


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = torch.randn(256, 500, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-9)):
        assert torch.equal(sample(logits, p, make_generator(3)), greedy)


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(temperature=1.0), {0, 1, 2, 3}),
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),  # 0.5 < 0.7 <= 0.8
        (SamplingParams(temperature=1.0, top_p=0.9), {0, 1, 2}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),  # p >= 0.25
        (SamplingParams(temperature=1.0, min_p=0.2), {0, 1, 2}),  # p >= 0.1
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.9, min_p=0.5), {0, 1}),  # {0,1,2} -> 0.15/0.5 < 0.5
    ],
    ids=["plain", "top_k2", "top_p0.7", "top_p0.9", "min_p0.5", "min_p0.2", "chain"],
)
def test_filters_keep_exactly_the_expected_support(params, allowed):
    seen = set(_draws(LOGITS, params).tolist())
    assert seen == allowed


def test_temperature_sharpens_distribution():
    hot = _draws(LOGITS, SamplingParams(temperature=2.0))
    cold = _draws(LOGITS, SamplingParams(temperature=0.25))
    assert (cold == 0).float().mean() > 0.8 > (hot == 0).float().mean()
    plain = _draws(LOGITS, SamplingParams(temperature=1.0), n=20000)
    freq = torch.bincount(plain, minlength=4).float() / plain.numel()
    torch.testing.assert_close(freq, PROBS, atol=0.02, rtol=0)


def test_sample_shapes():
    out = sample(torch.randn(3, 10), SamplingParams(temperature=1.0), make_generator(0))
    assert out.shape == (3,) and out.dtype == torch.long
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.randn(10), SamplingParams())
