"""Token sampling: pure functions over fp32 logits ``[B, V]`` with an explicit ``torch.Generator``.

Nothing here touches the global RNG: randomness comes only from the generator passed in (build one
with ``make_generator(params.seed, device)``), so a seeded run is reproducible whatever else the
process does with ``torch.manual_seed``.

``sample`` applies, in this order (the Hugging Face / vLLM order)::

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw from softmax

and takes the argmax of the penalised logits when ``temperature == 0`` (greedy; top-k/p and min-p
are then irrelevant).  llama.cpp's default chain is similar (penalties, top-k, top-p, min-p) but
applies temperature *last*, so with ``temperature != 1`` its top-p / min-p cut-offs are computed
on the untempered distribution and keep a different set of tokens.

The repetition penalty follows HF / llama.cpp (CTRL paper): for every *distinct* token among the
last ``window`` context tokens, a positive logit is divided by ``penalty`` and a negative one
multiplied by it (``window == 0``: the whole context).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_repetition_penalty", "sample", "make_generator"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.  Defaults: greedy, no filtering, no penalty."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with mass >= top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # keep tokens with prob >= min_p * max prob; 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats
    repetition_window: int = 64  # context tokens the penalty looks at; 0 = the whole context
    seed: int | None = None  # seed for the generator built by the engine when none is passed

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        if not _is_int(self.repetition_window) or self.repetition_window < 0:
            raise ValueError(
                f"repetition_window must be an int >= 0 (0 = whole context), got {self.repetition_window!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device``: seeded with ``seed``, or from OS entropy when ``seed`` is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic; never reads or advances the global RNG
    else:
        gen.manual_seed(seed)
    return gen


def _rows(history: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor, batch: int) -> list[list[int]]:
    if isinstance(history, torch.Tensor):
        history = history.tolist()
    history = list(history)
    if batch == 1 and (not history or _is_int(history[0])):
        history = [history]
    if len(history) != batch:
        raise ValueError(f"history has {len(history)} rows, logits have {batch}")
    return [list(h) for h in history]


def apply_repetition_penalty(
    logits: torch.Tensor,
    history_ids: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor,
    penalty: float,
    window: int = 64,
) -> torch.Tensor:
    """Penalise tokens seen in the last ``window`` history ids (0 = all); returns a new tensor.

    logits: [B, V] or [V]; history_ids: one id list per row (a flat list for a single row).
    Each distinct id is penalised once: ``logit / penalty`` if ``logit > 0`` else ``logit * penalty``.
    """
    if penalty == 1.0:
        return logits
    squeeze = logits.dim() == 1
    x = logits.unsqueeze(0) if squeeze else logits  # [B, V]
    B, V = x.shape
    rows = [h[-window:] if window > 0 else h for h in _rows(history_ids, B)]
    width = max((len(h) for h in rows), default=0)
    if width == 0:
        return logits
    # Pad with V (an extra, discarded column) so one scatter builds the [B, V] "seen" mask.
    idx = torch.tensor([h + [V] * (width - len(h)) for h in rows], dtype=torch.long, device=x.device)
    if bool(((idx < 0) | (idx > V)).any()):
        raise ValueError(f"history ids must be in [0, {V})")
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=x.device).scatter_(1, idx, True)[:, :V]
    out = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    return out.squeeze(0) if squeeze else out


def _top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= x.shape[-1]:
        return x
    kth = torch.topk(x, k, dim=-1).values[:, -1:]  # [B, 1]
    return x.masked_fill(x < kth, -math.inf)


def _top_p(x: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return x
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always stays (mass_before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return x.masked_fill(drop, -math.inf)


def _min_p(x: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return x
    probs = x.softmax(dim=-1)
    return x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: Sequence[Sequence[int]] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: logits [B, V] (any float dtype) -> ids [B] (int64).

    ``history``: per-row context ids for the repetition penalty (ignored when it is off).
    ``generator`` is required unless ``params.temperature == 0``; it must live on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    x = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        x = apply_repetition_penalty(x, history, params.repetition_penalty, params.repetition_window)
    if params.greedy:
        return x.argmax(dim=-1)
    if generator is None:
        raise ValueError("sampling with temperature > 0 needs an explicit torch.Generator (see make_generator)")
    x = x / params.temperature
    x = _top_k(x, params.top_k)
    x = _top_p(x, params.top_p)
    x = _min_p(x, params.min_p)
    probs = x.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
