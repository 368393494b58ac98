"""Token engine on a random tiny Kimi-Linear model: greedy == naive no-cache greedy, batching, stops, state reuse."""

from __future__ import annotations

import pytest
import torch

from kimiq.config import ModelConfig
from kimiq.generate import FINISH_LENGTH, FINISH_STOP, GenerationStats, SamplingParams, generate_tokens, prefill
from tests.conftest import random_model

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.tiny(), seed=11)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def naive_greedy(model, prompt: list[int], n: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """The oracle: full no-cache forward over the whole sequence every step, argmax of the last position."""
    ids, out = list(prompt), []
    for _ in range(n):
        tok = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(tok)
        if tok in stop_ids:
            break
        ids.append(tok)
    return out


def _collect(steps, B: int) -> tuple[list[list[int]], list[str | None]]:
    rows: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    for step in steps:
        assert len(step.tokens) == B
        for b, (t, f) in enumerate(zip(step.tokens, step.finished)):
            if t is not None:
                assert reasons[b] is None, "a finished row produced a token"
                rows[b].append(t)
            if f is not None:
                reasons[b] = f
    return rows, reasons


def test_greedy_matches_naive_ragged_batch(model):
    prompts = _prompts([13, 5])
    stats = GenerationStats()
    rows, reasons = _collect(generate_tokens(model, prompts, GREEDY, max_new_tokens=24, stats=stats), 2)
    for b, p in enumerate(prompts):
        assert rows[b] == naive_greedy(model, p, 24), f"row {b}"
    assert reasons == [FINISH_LENGTH, FINISH_LENGTH]
    assert stats.prefill_tokens == 18 and stats.generated_tokens == 48 and stats.decode_tokens == 46
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0 and stats.decode_tok_per_s > 0
    assert "tok/s" in stats.summary()


def test_single_prompt_and_return_value(model):
    prompt = _prompts([7], seed=1)[0]
    gen = generate_tokens(model, prompt, GREEDY, max_new_tokens=5)
    toks = []
    try:
        while True:
            toks.append(next(gen).token)
    except StopIteration as stop:
        stats = stop.value
    assert toks == naive_greedy(model, prompt, 5)
    assert isinstance(stats, GenerationStats) and stats.generated_tokens == 5


@pytest.mark.parametrize("n", [1, 3])
def test_max_new_tokens_respected(model, n):
    prompts = _prompts([4, 9], seed=2)
    state = model.new_state(2)
    rows, reasons = _collect(generate_tokens(model, prompts, GREEDY, max_new_tokens=n, state=state), 2)
    assert [len(r) for r in rows] == [n, n] and reasons == [FINISH_LENGTH] * 2
    # the state holds the prompt and every generated token but the last
    assert state.lengths.tolist() == [4 + n - 1, 9 + n - 1]


def test_max_new_tokens_zero_prefills_only(model):
    state = model.new_state(1)
    assert list(generate_tokens(model, [1, 2, 3], GREEDY, max_new_tokens=0, state=state)) == []
    assert state.lengths.tolist() == [3]


def test_stop_ids_stop_one_row_other_continues(model):
    prompts = _prompts([6, 11], seed=3)
    ref = [naive_greedy(model, p, 16) for p in prompts]
    k = next(i for i in range(3, 16) if ref[0][i] not in ref[0][:i] and ref[0][i] not in ref[1])
    stop = {ref[0][k]}
    rows, reasons = _collect(generate_tokens(model, prompts, GREEDY, max_new_tokens=16, stop_ids=stop), 2)
    assert rows[0] == ref[0][: k + 1]  # the stop id is yielded, then the row ends
    assert reasons == [FINISH_STOP, FINISH_LENGTH]
    assert rows[1] == ref[1]  # n_valid=0 for the stopped row leaves the other row exact


def test_continue_from_state_equals_fresh_prefill(model):
    a, b = _prompts([9, 6], seed=4)
    state = model.new_state(1)
    first = [s.token for s in generate_tokens(model, a, GREEDY, max_new_tokens=5, state=state)]
    # the last sampled token was not consumed: it goes in front of the next turn's tokens
    second = [s.token for s in generate_tokens(model, [first[-1]] + b, GREEDY, max_new_tokens=8, state=state)]
    assert second == naive_greedy(model, a + first + b, 8)
    assert state.lengths.tolist() == [len(a + first + b) + 7]


def test_seeded_sampling_reproducible(model):
    prompts = _prompts([5, 8], seed=5)
    p = SamplingParams(temperature=1.0, top_k=50, seed=123)

    def run(params, **kw):
        return _collect(generate_tokens(model, prompts, params, max_new_tokens=12, **kw), 2)[0]

    assert run(p) == run(p)
    assert run(p) != run(SamplingParams(temperature=1.0, top_k=50, seed=124))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert run(SamplingParams(temperature=1.0), generator=g1) == run(SamplingParams(temperature=1.0), generator=g2)


def test_top_k_one_sampling_equals_greedy(model):
    prompts = _prompts([5, 8], seed=6)
    p = SamplingParams(temperature=0.8, top_k=1, seed=0)
    sampled = _collect(generate_tokens(model, prompts, p, max_new_tokens=10), 2)[0]
    greedy = _collect(generate_tokens(model, prompts, GREEDY, max_new_tokens=10), 2)[0]
    assert sampled == greedy


def test_repetition_penalty_changes_output(model):
    prompt = _prompts([6], seed=7)[0]
    plain = [s.token for s in generate_tokens(model, prompt, GREEDY, max_new_tokens=24)]
    pen = SamplingParams(repetition_penalty=1e6, repetition_window=0)
    penalised = [s.token for s in generate_tokens(model, prompt, pen, max_new_tokens=24)]
    assert len(set(penalised)) == 24 and not set(penalised) & set(prompt)  # never repeats any context token
    assert penalised != plain or len(set(plain)) == 24


@torch.inference_mode()
def test_chunked_prefill_matches_one_shot(model):
    prompts = _prompts([37, 10], seed=8)
    s1, s2 = model.new_state(2), model.new_state(2)
    one = prefill(model, prompts, s1)
    chunked = prefill(model, prompts, s2, chunk_size=8)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=0)
    assert s1.lengths.tolist() == s2.lengths.tolist() == [37, 10]


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="at least one token"):
        list(generate_tokens(model, [[1, 2], []], GREEDY, max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(generate_tokens(model, [1], GREEDY, max_new_tokens=-1))
    with pytest.raises(ValueError, match="prompt ids"):
        list(generate_tokens(model, [1, 5000], GREEDY, max_new_tokens=2))
    with pytest.raises(ValueError, match="rows"):
        list(generate_tokens(model, [[1], [2]], GREEDY, max_new_tokens=2, state=model.new_state(1)))
