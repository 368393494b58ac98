"""Text layer over the token engine: streaming detokenization, stop strings, multi-turn chat.

``generate_text`` turns a prompt (text or ids) into a stream of text chunks.  It stops on a stop id
(default: the tokenizer's ``eos_id`` and ``im_end_id`` and the model config's ``eos_token_id``; the
stop token's text is never emitted), after ``max_new_tokens``, or on a stop string.  Stop strings
are matched on the decoded text, so one may span several tokens: text that could still be the start
of a stop string is held back until it is resolved, and nothing from the stop string on is emitted.

``ChatSession`` keeps the messages *and* the model state across turns.  Invariant: after each turn
the state has consumed exactly ``session.tokens``, which equals the chat template's rendering of
``session.messages`` (no generation prompt), so continuing the state is the same as re-prefilling
the whole conversation.  A new user turn renders the conversation and prefills only the tokens past
what the state already holds.  After generation, the assistant message (the emitted text) is
rendered; when the tokens already in the state are a prefix of that rendering (the usual case: the
reply ended on ``<|im_end|>``, which was sampled but not yet fed), only the rest is fed.  Otherwise
(a stop string cut the reply, the budget ran out mid-reply, special tokens were skipped, or the
tokenizer re-encodes the text differently) the state is restored from a snapshot taken just before
the turn's last prompt token and the rendered reply is prefilled: one cheap re-prefill of the reply.
"""

from __future__ import annotations

import time

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kimiq.generate.engine import FINISH_STOP, GenerationStats, _sync, generate_tokens, prefill
from kimiq.generate.sampling import SamplingParams, make_generator

__all__ = ["GenerationResult", "ChatSession", "generate_text", "default_stop_ids", "FINISH_STOP_STRING"]

FINISH_STOP_STRING = "stop_string"


@dataclass
class GenerationResult:
    """Filled in while a text stream runs."""

    token_ids: list[int] = field(default_factory=list)  # sampled ids, stop id included
    text: str = ""  # emitted text (stop string and what follows excluded)
    finish_reason: str | None = None  # "stop" | "stop_string" | "length"; None if the stream was abandoned
    stats: GenerationStats = field(default_factory=GenerationStats)


def default_stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """``[EOS]``, ``<|im_end|>`` and the config's eos id (whichever exist)."""
    ids = (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None), model.config.eos_token_id)
    return {int(i) for i in ids if i is not None}


class _StopStrings:
    """Incremental stop-string matcher: ``feed(text) -> (safe_text, hit)``."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0  # longest suffix that is a proper prefix of some stop string
        for k in range(min(len(self.buf), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(self.buf[-k:]) for s in self.stops):
                hold = k
                break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _check_stop_strings(stop_strings: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stops = tuple(stop_strings)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop_strings must be non-empty strings")
    return stops


def _stream(model, tokenizer, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
            stops: tuple[str, ...], stop_ids: set[int], state, generator: torch.Generator | None,
            result: GenerationResult, skip_special: bool, prefill_chunk_size: int, decode=None) -> Iterator[str]:
    decoder = tokenizer.stream(skip_special=skip_special)
    matcher = _StopStrings(stops)
    steps = generate_tokens(model, prompt_ids, params, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            state=state, generator=generator, stats=result.stats,
                            prefill_chunk_size=prefill_chunk_size,
                            vocab_limit=min(tokenizer.vocab_size, model.config.vocab_size), decode=decode)
    try:
        for step in steps:
            tok, reason = step.tokens[0], step.finished[0]
            assert tok is not None
            result.token_ids.append(tok)
            text = "" if reason == FINISH_STOP else decoder.feed(tok)
            if reason is not None:
                text += decoder.flush()
            out, hit = matcher.feed(text)
            if hit:
                reason = FINISH_STOP_STRING
            elif reason is not None:
                out += matcher.flush()
            result.text += out
            result.finish_reason = reason
            if out:
                yield out
            if reason is not None:
                break
    finally:
        steps.close()


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    *,
    stop_ids: set[int] | None = None,
    allow_special: bool = False,
    skip_special: bool = True,
    state: Any = None,
    generator: torch.Generator | None = None,
    result: GenerationResult | None = None,
    prefill_chunk_size: int = 0,
    decode=None,
) -> Iterator[str]:
    """Stream the completion of ``prompt`` (text, encoded with ``allow_special``, or ids) as text chunks.

    ``stop_ids`` default ``default_stop_ids(model, tokenizer)``; ``skip_special`` drops special tokens
    from the text.  ``result`` (optional) receives the ids, text, finish reason and timing stats.
    ``decode``: runs the single-token steps (``kimiq.generate.fast.DecodeStep``); default the model.
    """
    stops = _check_stop_strings(stop_strings)
    ids = tokenizer.encode(prompt, allow_special=allow_special) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if stop_ids is None:
        stop_ids = default_stop_ids(model, tokenizer)
    return _stream(model, tokenizer, ids, params, max_new_tokens, stops, stop_ids, state, generator,
                   result if result is not None else GenerationResult(), skip_special, prefill_chunk_size, decode)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model state kept across turns (see the module docstring).

        chat = ChatSession(model, tokenizer, params=SamplingParams(temperature=0.7, seed=0))
        for chunk in chat.send("Hello!"):
            print(chunk, end="")
        chat.last.stats.summary()

    ``send`` returns a stream; the turn (user + assistant message, state) is complete once the
    stream is exhausted or closed.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: str | None = None,
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 1024,
        stop_strings: Sequence[str] = (),
        stop_ids: set[int] | None = None,
        generator: torch.Generator | None = None,
        skip_special: bool = True,
        prefill_chunk_size: int = 0,
        template_kwargs: Mapping[str, Any] | None = None,
        decode=None,
    ) -> None:
        self.model = model
        self.decode = decode  # runs the single-token steps (kimiq.generate.fast.DecodeStep); None: the model
        self.tokenizer = tokenizer
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_strings = _check_stop_strings(stop_strings)
        self.stop_ids = default_stop_ids(model, tokenizer) if stop_ids is None else set(stop_ids)
        self.generator = generator
        self.skip_special = skip_special
        self.prefill_chunk_size = prefill_chunk_size
        self.template_kwargs = dict(template_kwargs or {})
        self.system = system
        self.last: GenerationResult | None = None
        self.resyncs = 0  # turns whose reply had to be re-prefilled (or state rebuilt)
        self._in_turn = False
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        if self._in_turn:
            raise RuntimeError("a reply stream is still open: exhaust or close() it first")
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.state = self.model.new_state(1)
        self.tokens: list[int] = []  # exactly the ids the state has consumed
        self._snap = None
        self._snap_len = 0

    # ---------------------------------------------------------------- state bookkeeping

    def _render(self, add_generation_prompt: bool) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=add_generation_prompt, **self.template_kwargs))

    def _rewind_to_prefix_of(self, target: list[int]) -> None:
        """Make ``self.tokens`` a prefix of ``target``: restore the turn snapshot, or start over."""
        n = _common_prefix(self.tokens, target)
        if n == len(self.tokens):
            return
        self.resyncs += 1
        if self._snap is not None and self._snap_len <= n:
            self.state.restore(self._snap)
            del self.tokens[self._snap_len :]
        else:
            self.state = self.model.new_state(1)
            self.tokens = []
            self._snap = None

    def _feed(self, ids: list[int]) -> None:
        if ids:
            prefill(self.model, [ids], self.state, chunk_size=self.prefill_chunk_size)
            self.tokens += ids

    # ---------------------------------------------------------------- turns

    def send(
        self,
        content: str,
        *,
        params: SamplingParams | None = None,
        max_new_tokens: int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Add a user message and stream the assistant's reply (per-turn overrides of the defaults).

        The turn is recorded when the stream is exhausted or closed; open one stream at a time.
        """
        if self._in_turn:
            raise RuntimeError("the previous reply stream is still open: exhaust or close() it first")
        stops = self.stop_strings if stop_strings is None else _check_stop_strings(stop_strings)
        params = self.params if params is None else params
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        return self._turn(content, params, n, stops)

    def _turn(self, content: str, params: SamplingParams, max_new_tokens: int,
              stops: tuple[str, ...]) -> Iterator[str]:
        if self._in_turn:
            raise RuntimeError("the previous reply stream is still open: exhaust or close() it first")
        self._in_turn = True
        try:
            yield from self._run_turn(content, params, max_new_tokens, stops)
        finally:
            self._in_turn = False

    def _run_turn(self, content: str, params: SamplingParams, max_new_tokens: int,
                  stops: tuple[str, ...]) -> Iterator[str]:
        self.messages.append({"role": "user", "content": content})
        try:
            target = self._render(add_generation_prompt=True)
        except Exception:
            self.messages.pop()  # e.g. a template error: leave the session as it was
            raise
        self._rewind_to_prefix_of(target)
        if len(self.tokens) == len(target):  # nothing new to prefill: cannot get next-token logits
            self.state, self.tokens, self._snap = self.model.new_state(1), [], None
        todo = target[len(self.tokens) :]
        result = GenerationResult()
        t0 = time.perf_counter()
        self._feed(todo[:-1])  # the stats count this prefill too (the last prompt token goes through _stream)
        _sync(self.model.device)
        result.stats.prefill_tokens += len(todo) - 1
        result.stats.prefill_seconds += time.perf_counter() - t0
        self._snap, self._snap_len = self.state.snapshot(), len(self.tokens)
        if self.generator is None and not params.greedy:
            self.generator = make_generator(params.seed, self.model.device)

        before = int(self.state.lengths[0])
        try:
            yield from _stream(self.model, self.tokenizer, todo[-1:], params, max_new_tokens, stops,
                               self.stop_ids, self.state, self.generator, result, self.skip_special,
                               self.prefill_chunk_size, self.decode)
        finally:
            consumed = int(self.state.lengths[0]) - before
            self.tokens += (todo[-1:] + result.token_ids)[:consumed]
            self.messages.append({"role": "assistant", "content": result.text})
            self.last = result
            # Bring the state to the rendered conversation (usually: feed the sampled <|im_end|>).
            target = self._render(add_generation_prompt=False)
            self._rewind_to_prefix_of(target)
            self._feed(target[len(self.tokens) :])
