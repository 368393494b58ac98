"""Perplexity over non-overlapping token windows, llama-perplexity style; the windows ``kld`` scores too.

    tokens = heldout_tokens(tokenizer, limit_tokens=8192)      # the default model's held-out split
    res = perplexity(model, tokenizer, tokens, ctx=512)        # res.nll [N], res.report
    print(res.report)                                          # PPL = P +/- SE over N tokens in W windows

Data: documents become one token stream ``[EOS] doc [EOS] doc ...`` (the [EOS] marks "a new document
starts", as in training and ``kimiq.eval.bpb``).  The default data is the held-out ``test`` split of the
stdlib sources (``kimiq.train.data``); any text or token ids can be passed instead.

Windows: the stream is cut into ``floor(n / ctx)`` non-overlapping windows of ``ctx`` tokens (the tail is
dropped), each run from a fresh state.  Within a window, logits at positions ``first .. ctx-2`` predict
tokens ``first+1 .. ctx-1``:

* ``score="second-half"`` (default): ``first = ctx // 2``, so every scored token has at least ``ctx/2``
  tokens of context; ``ctx - ctx//2 - 1`` tokens per window (255 for 512), as ``llama-perplexity``
  (``quantization-formats.md`` §6.1), so numbers are comparable with llama.cpp's at the same ``-c``.
* ``score="all"``: ``first = 0``, ``ctx - 1`` tokens per window, as ``mlx_lm.perplexity`` (§6.3).

Unlike llama.cpp no window's first token is replaced by a BOS: kimiq's models have no BOS convention and
were trained on windows cut anywhere in such a stream.  PPL +- SE: ``kimiq.eval.metrics.perplexity_and_se``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .metrics import perplexity_and_se, token_nll

__all__ = ["SCORES", "Windows", "heldout_tokens", "token_stream", "window_logprobs", "PplReport", "PplResult",
           "perplexity"]

SCORES = ("second-half", "all")


@dataclass(frozen=True)
class Windows:
    """``n`` windows of ``ctx`` tokens from the start of a token stream, scored from position ``first``."""

    ctx: int
    score: str
    n: int

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.ctx < 4:
            raise ValueError(f"ctx must be >= 4, got {self.ctx}")

    @classmethod
    def over(cls, n_tokens: int, ctx: int = 512, score: str = "second-half",
             limit_tokens: int | None = None) -> Windows:
        """As many windows as fit in ``min(n_tokens, limit_tokens)`` tokens (at least one)."""
        avail = min(n_tokens, limit_tokens) if limit_tokens else n_tokens
        n = avail // ctx
        if n < 1:
            raise ValueError(f"need at least ctx = {ctx} tokens, have {avail}")
        return cls(ctx, score, n)

    @property
    def first(self) -> int:
        return self.ctx // 2 if self.score == "second-half" else 0

    @property
    def per_window(self) -> int:
        return self.ctx - self.first - 1

    @property
    def n_scored(self) -> int:
        return self.n * self.per_window

    @property
    def n_tokens(self) -> int:
        return self.n * self.ctx


def token_stream(tokenizer, docs: Sequence[str] | Sequence[tuple[str, str]]) -> torch.Tensor:
    """``[EOS] doc [EOS] doc ...`` as one 1-D long tensor; docs are texts or (name, text) pairs."""
    eos = tokenizer.token_to_id("[EOS]")
    ids: list[int] = []
    for d in docs:
        ids.append(eos)
        ids.extend(tokenizer.encode(d[1] if isinstance(d, tuple) else d))
    return torch.tensor(ids, dtype=torch.long)


def heldout_tokens(tokenizer, limit_tokens: int | None = None, split: str = "test") -> torch.Tensor:
    """The held-out split of the stdlib sources as a token stream, files read until ``limit_tokens`` are there."""
    from kimiq.train.data import read_source, split_files

    parts, n = [], 0
    for _, f in split_files(split):
        if (text := read_source(f)) is None:
            continue
        parts.append(token_stream(tokenizer, [text]))
        n += parts[-1].numel()
        if limit_tokens and n >= limit_tokens:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def as_tokens(tokenizer, texts_or_ids) -> torch.Tensor:
    """None -> held-out split; str / [str] / [(name, str)] -> ``token_stream``; ids (tensor or [int]) -> as is."""
    if texts_or_ids is None:
        return heldout_tokens(tokenizer)
    if isinstance(texts_or_ids, str):
        return token_stream(tokenizer, [texts_or_ids])
    if isinstance(texts_or_ids, torch.Tensor):
        return texts_or_ids.flatten().long()
    items = list(texts_or_ids)
    if items and isinstance(items[0], int):
        return torch.tensor(items, dtype=torch.long)
    return token_stream(tokenizer, items)


@torch.inference_mode()
def window_logprobs(model, tokens: torch.Tensor, windows: Windows,
                    chunk: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (log-probs [per_window, V] fp32 at the scored positions, their targets [per_window]).

    Each window starts from a fresh state and is fed in ``chunk``-token pieces (state carried), so only
    the scored logits are kept.
    """
    for w in range(windows.n):
        ids = tokens[w * windows.ctx : (w + 1) * windows.ctx].to(model.device).view(1, -1)
        state = model.new_state(1, capacity=windows.ctx)
        lps = []
        for a in range(0, windows.ctx - 1, chunk):
            b = min(a + chunk, windows.ctx - 1)  # the last token is only a target
            logits = model(ids[:, a:b], state)[0]  # [b - a, V] fp32
            lo = max(windows.first - a, 0)
            if lo < b - a:
                lps.append(torch.log_softmax(logits[lo:].float(), dim=-1))
        yield torch.cat(lps), ids[0, windows.first + 1 :]


@dataclass(frozen=True)
class PplReport:
    ppl: float
    ppl_se: float
    n_tokens: int  # scored
    n_windows: int
    ctx: int
    score: str

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "ppl_se": self.ppl_se, "n_tokens": self.n_tokens, "n_windows": self.n_windows,
                    "ctx": self.ctx, "score": self.score}

    def __str__(self) -> str:
        return (f"PPL = {self.ppl:.4f} +/- {self.ppl_se:.4f}  ({self.n_tokens:,} tokens scored in {self.n_windows} "
                f"windows of {self.ctx}, {self.score})")


@dataclass(frozen=True)
class PplResult:
    nll: torch.Tensor  # [n_tokens] nats, window-major
    report: PplReport


def perplexity(model, tokenizer, texts_or_ids=None, ctx: int = 512, score: str = "second-half",
               limit_tokens: int | None = None, progress: Callable[[int], None] | None = None) -> PplResult:
    """PPL of ``model`` over non-overlapping ``ctx`` windows (see the module docstring).

    ``texts_or_ids``: None (held-out split, read only as far as ``limit_tokens`` needs), text(s), or token ids.
    ``progress(w)`` is called after each window.
    """
    tokens = heldout_tokens(tokenizer, limit_tokens) if texts_or_ids is None else as_tokens(tokenizer, texts_or_ids)
    windows = Windows.over(tokens.numel(), ctx, score, limit_tokens)
    nlls = []
    for w, (lp, tgt) in enumerate(window_logprobs(model, tokens, windows)):
        nlls.append(token_nll(lp, tgt).cpu())
        if progress is not None:
            progress(w)
    nll = torch.cat(nlls)
    ppl, se = perplexity_and_se(nll)
    return PplResult(nll, PplReport(ppl, se, nll.numel(), windows.n, ctx, score))
