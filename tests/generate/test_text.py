"""Text layer: stop strings / stop ids on a scripted model, chat-session state == full re-prefill on a real one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kimiq.config import ModelConfig
from kimiq.generate import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, ChatSession, GenerationResult
from kimiq.generate import SamplingParams, generate_text
from kimiq.generate.text import _StopStrings
from kimiq.model.state import ModelState
from kimiq.tokenizer import Tokenizer
from tests.conftest import random_model

TOK = Tokenizer({bytes([i]): i for i in range(256)})  # byte-level: ids 0..255 bytes, 256..511 special
EOS, IM_END = TOK.eos_id, TOK.im_end_id


class ScriptedModel:
    """Emits ``script`` token by token after the prompt (nanochat's MockModel idea); batch 1."""

    def __init__(self, script: list[int], vocab: int = 512):
        self.script = script
        self.config = SimpleNamespace(vocab_size=vocab, eos_token_id=None)
        self.device = torch.device("cpu")
        self.prompt_len = 0

    def new_state(self, batch_size: int, capacity: int = 0) -> ModelState:
        return ModelState([], torch.zeros(batch_size, dtype=torch.long))

    def __call__(self, ids, state, *, n_valid=None, last_only=False):
        if int(state.lengths[0]) == 0:
            self.prompt_len = ids.shape[1]
        state.lengths += ids.shape[1] if n_valid is None else n_valid
        pos = int(state.lengths[0]) - self.prompt_len
        logits = torch.zeros(ids.shape[0], 1, self.config.vocab_size)
        logits[:, 0, self.script[pos] if pos < len(self.script) else 0] = 10.0
        return logits


def _run(script_text: str, *, tail: list[int] = (), stop_strings=(), max_new_tokens=100):
    model = ScriptedModel(list(script_text.encode()) + list(tail))
    result = GenerationResult()
    chunks = list(generate_text(model, TOK, "hi", SamplingParams(), max_new_tokens, stop_strings, result=result))
    return chunks, result


def test_stop_id_ends_text_and_is_not_emitted():
    chunks, res = _run("héllo wörld", tail=[IM_END, 65, 66])
    assert "".join(chunks) == res.text == "héllo wörld"
    assert res.finish_reason == FINISH_STOP and res.token_ids[-1] == IM_END
    assert "\ufffd" not in "".join(chunks)  # multi-byte characters are never split
    _, res = _run("abc", tail=[EOS])
    assert res.text == "abc" and res.finish_reason == FINISH_STOP


def test_max_new_tokens_text():
    chunks, res = _run("abcdefghij", max_new_tokens=4)
    assert "".join(chunks) == "abcd" and res.finish_reason == FINISH_LENGTH and len(res.token_ids) == 4


@pytest.mark.parametrize(
    "stops, expect",
    [
        (["World"], "Hello, "),  # spans 5 tokens
        (["lo, W", "xyz"], "Hel"),
        (["orld!", "llo"], "He"),  # the earliest match wins
        (["Hello"], ""),
        (["o?"], "Hello, World! Bye"),  # a held-back prefix ("o") is released at the end
        (["!"], "Hello, World"),
    ],
)
def test_stop_strings_trimmed(stops, expect):
    chunks, res = _run("Hello, World! Bye", tail=[IM_END], stop_strings=stops)
    assert "".join(chunks) == res.text == expect
    hit = any(s in "Hello, World! Bye" for s in stops)
    assert res.finish_reason == (FINISH_STOP_STRING if hit else FINISH_STOP)
    for s in stops:
        assert s not in "".join(chunks)


def test_stop_string_holdback_never_emits_stop_prefix_early():
    m = _StopStrings(["<end>"])
    assert m.feed("ab<e") == ("ab", False)  # "<e" might start "<end>"
    assert m.feed("x<") == ("<ex", False)  # resolved: not a stop; "<" held again
    assert m.feed("en") == ("", False)
    assert m.feed("d>tail") == ("", True)
    m = _StopStrings(["aab"])
    assert m.feed("aa") == ("", False) and m.feed("ab") == ("a", True)  # overlapping prefix
    assert _StopStrings([]).feed("anything") == ("anything", False)


def test_invalid_stop_strings():
    with pytest.raises(ValueError, match="stop_strings"):
        generate_text(ScriptedModel([]), TOK, "hi", stop_strings=[""])


# ---------------------------------------------------------------------------- chat session on a real model


class SteeredModel:
    """Wraps a real model: the returned logits are limited to printable ASCII, and the ``force_at``-th
    sampled token of each generation is forced to ``force_tok``.  The state is the real model's, so the
    state stays exactly what the tokens fed imply.  Records (tokens consumed after the call, raw logits)."""

    def __init__(self, model, force_at: int | None = None, force_tok: int = IM_END):
        self.model, self.force_at, self.force_tok = model, force_at, force_tok
        self.config, self.device, self.new_state = model.config, model.device, model.new_state
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.n = 0

    def __call__(self, ids, state, **kw):
        out = self.model(ids, state, **kw)
        self.calls.append((int(state.lengths[0]), out.clone()))
        if kw.get("last_only"):
            masked = torch.full_like(out, -1e9)
            masked[..., 32:127] = out[..., 32:127]
            if self.force_at is not None and self.n == self.force_at:
                masked[..., self.force_tok] = 1e9
            self.n += 1
            return masked
        return out


@pytest.fixture(scope="module")
def chat_model():
    return random_model(ModelConfig.tiny(vocab_size=512, eos_token_id=IM_END), seed=21)


@torch.inference_mode()
def _full_prefill_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), model.new_state(1), last_only=True)[0, 0]


@pytest.mark.parametrize(
    "force_at, turn_kw, resync",  # (this seed's greedy ASCII reply starts "WP88Cn;UI...")
    [
        (6, {}, False),  # reply ends on a sampled <|im_end|>: only that token is fed afterwards
        (None, dict(max_new_tokens=7), False),  # budget: last token + <|im_end|> fed
        (None, dict(max_new_tokens=12, stop_strings=["8C"]), True),  # cut by a stop string: re-prefill
    ],
    ids=["im_end", "length", "stop_string"],
)
def test_chat_second_turn_equals_full_prefill(chat_model, force_at, turn_kw, resync):
    model = SteeredModel(chat_model, force_at=force_at)
    chat = ChatSession(model, TOK, system="Be brief.", params=SamplingParams(), max_new_tokens=30)
    reply = "".join(chat.send("Hello there", **turn_kw))
    assert chat.messages[-1] == {"role": "assistant", "content": reply}
    if force_at is not None:
        assert chat.last.finish_reason == FINISH_STOP and chat.last.token_ids[-1] == IM_END
    expect_tokens = TOK.apply_chat_template(chat.messages, add_generation_prompt=False)
    assert chat.tokens == expect_tokens and int(chat.state.lengths[0]) == len(expect_tokens)
    assert chat.resyncs == int(resync)
    if "stop_strings" in turn_kw:
        assert chat.last.finish_reason == FINISH_STOP_STRING and "8C" not in reply

    model.force_at, model.n = None, 0
    n_before = len(model.calls)
    second = "".join(chat.send("And again?", max_new_tokens=3))
    prompt2 = TOK.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)
    # the turn-2 call that consumed the prompt's final token
    turn2_logits = next(out for n, out in model.calls[n_before:] if n == len(prompt2))[0, -1]
    torch.testing.assert_close(turn2_logits, _full_prefill_logits(chat_model, prompt2), atol=1e-4, rtol=0)
    assert len(second) > 0
    assert chat.tokens == TOK.apply_chat_template(chat.messages, add_generation_prompt=False)


def test_chat_session_greedy_replies_match_fresh_generation(chat_model):
    """Two turns through the session produce the same text as a fresh generate_text on the full prompt."""
    model = SteeredModel(chat_model)
    chat = ChatSession(model, TOK, max_new_tokens=8)
    for user in ("one", "two"):
        reply = "".join(chat.send(user))
        prompt = TOK.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)
        fresh = "".join(generate_text(SteeredModel(chat_model), TOK, prompt, SamplingParams(), 8))
        assert reply == fresh
    assert chat.resyncs == 0
    chat.reset()
    assert chat.messages == [] and chat.tokens == [] and int(chat.state.lengths[0]) == 0


def test_chat_one_open_stream_at_a_time(chat_model):
    chat = ChatSession(SteeredModel(chat_model), TOK, max_new_tokens=4)
    stream = chat.send("hi")
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        chat.send("again")
    stream.close()  # closing early records the partial reply and syncs the state
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.tokens == TOK.apply_chat_template(chat.messages, add_generation_prompt=False)
    assert int(chat.state.lengths[0]) == len(chat.tokens)
    assert "".join(chat.send("again"))
