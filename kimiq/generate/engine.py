"""Generation engine: prefill + one-token-per-step decode over token ids only.

The engine knows nothing about text (the nanochat rule): prompts are id lists, stop conditions are
ids and a token budget; ``kimiq.generate.text`` owns detokenization and stop strings.

    for step in generate_tokens(model, [[1, 2, 3], [4, 5]], SamplingParams(), max_new_tokens=32,
                                stop_ids={eos}):
        step.tokens    # [B] new id per row (None once a row has finished)

Batching: ragged prompts are right-padded and prefilled in one ``model(ids, state, n_valid=...)``
call; each decode step feeds every row its last token, rows that finished pass ``n_valid = 0``
(their state does not move).  The batch shares one ``SamplingParams`` and one generator.

State contract: the engine consumes each prompt, then every generated token **except the last one
sampled** for its row (a sampled token is only fed to the model to produce the next one).  A caller
that continues from the state (multi-turn chat) feeds that token itself, e.g. with ``prefill``.
Passing ``state=`` continues an existing conversation: only the new ``prompt_ids`` are prefilled.

Timing: ``GenerationStats`` splits prefill (prompt forward + first sample) from decode (the
per-token steps).  Both stop at a host sync (``.tolist()`` of the sampled ids), so the numbers are
true device time on GPUs; time the consumer spends between steps is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from kimiq.generate.sampling import SamplingParams, make_generator, sample
from kimiq.ops import qops

__all__ = ["GenerationStats", "Step", "generate_tokens", "prefill", "FINISH_STOP", "FINISH_LENGTH"]

FINISH_STOP = "stop"  # sampled a stop id (the id is yielded, then the row ends)
FINISH_LENGTH = "length"  # produced max_new_tokens


@dataclass
class GenerationStats:
    """Token counts and wall seconds of one generation (filled in as it runs)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens sampled by decode steps (the first token per row comes from prefill)
    decode_seconds: float = 0.0
    generated_tokens: int = 0  # all sampled tokens, stop ids included

    @property
    def prefill_tok_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prefill {self.prefill_tokens} tok in {self.prefill_seconds:.3f}s ({self.prefill_tok_per_s:.1f} tok/s), "
            f"decode {self.decode_tokens} tok in {self.decode_seconds:.3f}s ({self.decode_tok_per_s:.1f} tok/s)"
        )


@dataclass(frozen=True)
class Step:
    """One decode step: the new id per row, and which rows finished on it (and why)."""

    tokens: list[int | None]  # None for rows that had already finished
    finished: list[str | None] = field(default_factory=list)  # FINISH_STOP / FINISH_LENGTH on the last step

    @property
    def token(self) -> int | None:
        """The new id of a single-row generation."""
        return self.tokens[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, prompts: Sequence[Sequence[int]], state, *, chunk_size: int = 0) -> torch.Tensor:
    """Feed right-padded ragged ``prompts`` into ``state``; return fp32 logits [B, V] at each row's last token.

    ``chunk_size > 0`` splits long prompts into pieces of that many positions (bounds activation memory);
    rows whose prompt ended in an earlier piece pass ``n_valid = 0``.  Empty prompts are an error.
    """
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    if B == 0 or min(lengths) == 0:
        raise ValueError("every prompt must have at least one token")
    T = max(lengths)
    device = model.device
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : lengths[b]] = torch.as_tensor(list(p), dtype=torch.long)
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab})")
    ids = ids.to(device)
    n = torch.tensor(lengths, device=device)
    step = chunk_size if chunk_size > 0 else T
    last: torch.Tensor | None = None
    for a in range(0, T, step):
        b_ = min(a + step, T)
        n_valid = (n - a).clamp(0, b_ - a)
        ragged = bool((n_valid < b_ - a).any())
        out = model(ids[:, a:b_], state, n_valid=n_valid if ragged else None, last_only=True)[:, 0]  # [B, V]
        ends_here = ((n > a) & (n <= b_)).view(B, 1)
        last = out if last is None else torch.where(ends_here, out, last)
    assert last is not None
    return last


def _prompt_rows(prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    rows = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if rows and all(isinstance(x, int) and not isinstance(x, bool) for x in rows):
        return [rows]
    if not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        raise ValueError("prompt_ids must be a non-empty list of ids or a list of id lists")
    return [list(r) for r in rows]


@torch.inference_mode()
def generate_tokens(
    model,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    params: SamplingParams = SamplingParams(),
    *,
    max_new_tokens: int,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    state=None,
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
    prefill_chunk_size: int = 0,
    vocab_limit: int | None = None,
    decode=None,
) -> Generator[Step, None, GenerationStats]:
    """Prefill ``prompt_ids`` (one list, or one list per row) then yield one ``Step`` per decode step.

    A row ends when it samples an id in ``stop_ids`` (that id is yielded, not fed to the model) or
    after ``max_new_tokens`` tokens.  ``state``: continue from it (must have one row per prompt);
    default a fresh ``model.new_state``.  ``generator``: default built from ``params.seed``.
    ``stats`` is filled in as the generation runs and is also the generator's return value.
    The repetition penalty sees this call's prompt + generated ids (not earlier turns in ``state``).
    ``vocab_limit``: never sample ids >= this (a model's embedding is often padded past its tokenizer's
    vocabulary; those rows are never trained and have no text).
    ``decode``: what runs the single-token steps, called like the model (e.g. ``kimiq.generate.fast.DecodeStep``,
    the compiled step); default the model itself.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    rows = _prompt_rows(prompt_ids)
    B = len(rows)
    stats = stats if stats is not None else GenerationStats()
    device = model.device
    if device.type == "cpu":  # kimiq's C++ operators (KDA decode step, quantized layers), built once per machine
        qops.available()
    if state is None:
        state = model.new_state(B, capacity=max(map(len, rows)) + max_new_tokens)
    elif state.batch_size != B:
        raise ValueError(f"state has {state.batch_size} rows, got {B} prompts")
    if generator is None and not params.greedy:
        generator = make_generator(params.seed, device)
    stop = frozenset(int(s) for s in stop_ids)
    history = [list(r) for r in rows]
    use_history = params.repetition_penalty != 1.0
    V = model.config.vocab_size
    if vocab_limit is not None and not 0 < vocab_limit <= V:
        raise ValueError(f"vocab_limit must be in (0, {V}], got {vocab_limit}")
    cut = vocab_limit if vocab_limit is not None and vocab_limit < V else None

    def pick(logits: torch.Tensor) -> list[int]:
        if cut is not None:
            logits[:, cut:] = float("-inf")
        return sample(logits, params, generator, history if use_history else None).tolist()

    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, rows, state, chunk_size=prefill_chunk_size)
    if max_new_tokens == 0:
        _sync(device)
        stats.prefill_tokens += sum(map(len, rows))
        stats.prefill_seconds += time.perf_counter() - t0
        return stats
    tokens = pick(logits)
    stats.prefill_tokens += sum(map(len, rows))
    stats.prefill_seconds += time.perf_counter() - t0

    active = [True] * B
    n_new = 0
    while True:
        n_new += 1
        finished: list[str | None] = [None] * B
        out: list[int | None] = [None] * B
        for b in range(B):
            if not active[b]:
                continue
            out[b] = tokens[b]
            history[b].append(tokens[b])
            if tokens[b] in stop:
                finished[b] = FINISH_STOP
            elif n_new >= max_new_tokens:
                finished[b] = FINISH_LENGTH
            stats.generated_tokens += 1
        yield Step(out, finished)
        active = [a and f is None for a, f in zip(active, finished)]
        if not any(active):
            return stats

        t0 = time.perf_counter()
        feed = torch.tensor([[t if a else 0] for t, a in zip(tokens, active)], dtype=torch.long, device=device)
        n_valid = None if all(active) else torch.tensor(active, dtype=torch.long, device=device)
        logits = (decode or model)(feed, state, n_valid=n_valid, last_only=True)[:, 0]  # [B, V]
        sampled = pick(logits)
        tokens = [s if a else 0 for s, a in zip(sampled, active)]
        stats.decode_tokens += sum(active)
        stats.decode_seconds += time.perf_counter() - t0
