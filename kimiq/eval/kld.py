"""KL divergence of a model against a base model on the same token windows (``llama-perplexity --kl-divergence``).

    base = base_logits(base_model, tokens, windows)            # once; base.save("base.safetensors")
    res = kld_vs_saved(model, BaseLogits.load("base.safetensors"))
    res = kld_vs_model(model, base_model, tokens, windows)     # exact full-vocabulary KL, both models loaded
    print(res.report)                                          # kimiq.eval.metrics.KldReport

Windows and scored positions are ``kimiq.eval.ppl.Windows`` (second half of each window by default).
Per scored position the base contributes its nll of the actual next token, its argmax, its top-2
probability gap and its distribution: in full (``kld_vs_model``, or ``k=0``) or as the top-k log-probs +
the log of the remaining mass (``metrics.kl_divergence_topk``, a lower bound of the exact KL).

Saved base file (safetensors; the role of llama.cpp's ``--kl-divergence-base`` file, §6.2 of
``quantization-formats.md``, which keeps every vocab entry as a uint16 code over ``[max - 16, max]``)::

    tokens  int32 [W * ctx]   the windows' tokens, so the file is reusable without the data
    nll     fp32  [N]         base nll of each scored position's next token (exact)
    argmax  int32 [N]         base top-1
    gap     fp32  [N]         base p1 - p2
    top     fp32  [N, k]      base top-k log-probs, sorted (k = 0 / V: the full log-probs in id order)
    ids     int32 [N, k]      their token ids (absent for the full distribution)
    rest    fp32  [N]         log of the base mass outside the top-k (-inf for the full distribution)
    metadata: format, ctx, score, n_windows, n_vocab, k, base

Default ``k = 0``: the full distribution in fp32, so the saved-base KL is the exact one (4 x vocab bytes
per position: 16 KB for the default model, 655 KB for Kimi's 163,840, twice llama.cpp's uint16 file).
Top-k (``--top-k K``) is 8 bytes x K per position but only a lower bound, and a loose one on a model as
flat as the default one, whose top-32 holds 77 % of the mass on average.  Measured on the default model
(1,020 positions of the held-out split, ctx 512, ratio to the exact mean KLD)::

    k          8      32     64     128    256    512
    q8_0       0.67   0.83   0.87   0.91   0.94   0.97
    q4_k_m     0.56   0.75   0.83   0.89   0.93   0.96
    (llama.cpp-style truncated sum without the rest bucket, q8_0: 0.02 0.36 0.51 0.65 0.73 0.83)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .metrics import KldReport, kl_divergence, kl_divergence_topk, kld_report, token_nll, top2_gap, topk_summary
from .ppl import Windows, window_logprobs

__all__ = ["DEFAULT_K", "BaseLogits", "KldResult", "base_logits", "kld_vs_saved", "kld_vs_model"]

DEFAULT_K = 0  # full distribution: exact KL (see the module docstring)
_FORMAT = "kimiq-base-logits/1"


@dataclass(frozen=True)
class BaseLogits:
    """What a base model says at every scored position of ``windows`` over ``tokens`` (layout: module docstring)."""

    tokens: torch.Tensor
    windows: Windows
    n_vocab: int
    nll: torch.Tensor
    argmax: torch.Tensor
    gap: torch.Tensor
    top: torch.Tensor
    ids: torch.Tensor | None  # None: ``top`` is the full distribution in id order
    rest: torch.Tensor
    source: str = ""

    @property
    def k(self) -> int:
        return self.top.shape[-1]

    def rows(self, w: int) -> slice:
        n = self.windows.per_window
        return slice(w * n, (w + 1) * n)

    def check(self, tokens: torch.Tensor, windows: Windows, n_vocab: int | None = None) -> None:
        """Raise ValueError unless these are the same windows over the same tokens (and vocabulary)."""
        if windows != self.windows:
            raise ValueError(f"base logits were saved for {self.windows}, asked for {windows}")
        if not torch.equal(tokens[: windows.n_tokens].int().cpu(), self.tokens):
            raise ValueError("base logits were saved for different tokens (data or tokenizer differ)")
        if n_vocab is not None and n_vocab != self.n_vocab:
            raise ValueError(f"base logits have vocabulary {self.n_vocab}, the model {n_vocab}")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        t = {"tokens": self.tokens, "nll": self.nll, "argmax": self.argmax, "gap": self.gap, "top": self.top,
             "rest": self.rest}
        if self.ids is not None:
            t["ids"] = self.ids
        meta = {"format": _FORMAT, "ctx": str(self.windows.ctx), "score": self.windows.score,
                "n_windows": str(self.windows.n), "n_vocab": str(self.n_vocab), "k": str(self.k), "base": self.source}
        save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> BaseLogits:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a kimiq base-logits file (format {meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        windows = Windows(int(meta["ctx"]), meta["score"], int(meta["n_windows"]))
        return cls(t["tokens"], windows, int(meta["n_vocab"]), t["nll"], t["argmax"], t["gap"], t["top"],
                   t.get("ids"), t["rest"], meta.get("base", ""))


@dataclass(frozen=True)
class KldResult:
    report: KldReport
    kld: torch.Tensor  # [N] per scored position, window-major
    nll: torch.Tensor  # model
    nll_base: torch.Tensor
    same_top: torch.Tensor
    base: BaseLogits | None = None  # kld_vs_model(save_k=...): the base summary, to save


def _summary(lp: torch.Tensor, tgt: torch.Tensor, k: int | None) -> dict[str, torch.Tensor | None]:
    """One window of base log-probs [n, V] -> the BaseLogits fields for its rows (on the CPU)."""
    if not k or k >= lp.shape[-1]:
        top, ids, rest = lp.float(), None, torch.full(lp.shape[:1], float("-inf"), device=lp.device)
        top2 = lp.topk(2, dim=-1).values
    else:
        top, ids, rest = topk_summary(lp, k)
        top2 = top
    d = {"nll": token_nll(lp, tgt).float(), "argmax": lp.argmax(-1).int(), "gap": top2_gap(top2).float(),
             "top": top, "ids": ids, "rest": rest.float()}
    return {k_: (v.cpu() if v is not None else None) for k_, v in d.items()}


def _cat(parts: list[dict], key: str) -> torch.Tensor | None:
    return None if parts[0][key] is None else torch.cat([p[key] for p in parts])


def base_logits(base_model, tokens: torch.Tensor, windows: Windows, k: int | None = DEFAULT_K, source: str = "",
                progress: Callable[[int], None] | None = None) -> BaseLogits:
    """Run ``base_model`` over ``windows`` and keep its top-``k`` summary (``k`` 0 or None: the full distributions)."""
    parts = []
    for w, (lp, tgt) in enumerate(window_logprobs(base_model, tokens, windows)):
        parts.append(_summary(lp, tgt, k))
        if progress is not None:
            progress(w)
    return _base_from(parts, tokens, windows, base_model.config.vocab_size, source)


def _base_from(parts, tokens, windows, n_vocab, source) -> BaseLogits:
    return BaseLogits(tokens[: windows.n_tokens].int().cpu(), windows, n_vocab,
                      *(_cat(parts, f) for f in ("nll", "argmax", "gap", "top", "ids", "rest")), source=source)


def _result(parts: list[dict], base: BaseLogits | None = None) -> KldResult:
    kld, nll, nll_b, same, gap = (torch.cat([p[f] for p in parts]) for f in ("kld", "nll", "nll_base", "same", "gap"))
    return KldResult(kld_report(kld, nll, nll_b, same, gap), kld, nll, nll_b, same, base)


def kld_vs_saved(model, base: BaseLogits, progress: Callable[[int], None] | None = None) -> KldResult:
    """KL(base || model) at the saved positions, re-running ``model`` on the saved tokens."""
    if model.config.vocab_size != base.n_vocab:
        raise ValueError(f"base logits have vocabulary {base.n_vocab}, the model {model.config.vocab_size}")
    parts = []
    for w, (lp, tgt) in enumerate(window_logprobs(model, base.tokens.long(), base.windows)):
        r = base.rows(w)
        dev = lp.device
        top, rest = base.top[r].to(dev), base.rest[r].to(dev)
        if base.ids is None:
            kld = kl_divergence(top, lp)
        else:
            kld = kl_divergence_topk(top, base.ids[r].to(dev), rest, lp)
        parts.append({"kld": kld.cpu(), "nll": token_nll(lp, tgt).cpu(), "nll_base": base.nll[r],
                          "same": (lp.argmax(-1).cpu() == base.argmax[r].long()), "gap": base.gap[r]})
        if progress is not None:
            progress(w)
    return _result(parts)


def kld_vs_model(model, base_model, tokens: torch.Tensor, windows: Windows, save_k: int | None = None,
                 source: str = "", progress: Callable[[int], None] | None = None) -> KldResult:
    """Exact full-vocabulary KL(base || model), both models run window by window.

    ``save_k``: also keep the base's top-k summary (``result.base``; 0 = full) for a later ``kld_vs_saved``.
    """
    if model.config.vocab_size != base_model.config.vocab_size:
        raise ValueError(f"vocabularies differ: base {base_model.config.vocab_size}, model {model.config.vocab_size}")
    parts, saved = [], []
    pairs = zip(window_logprobs(base_model, tokens, windows), window_logprobs(model, tokens, windows))
    for w, ((lp_b, tgt), (lp, _)) in enumerate(pairs):
        lp_b = lp_b.to(lp.device)
        tgt = tgt.to(lp.device)
        p1p2 = lp_b.topk(2, dim=-1).values
        parts.append({"kld": kl_divergence(lp_b, lp).cpu(), "nll": token_nll(lp, tgt).cpu(),
                          "nll_base": token_nll(lp_b, tgt).cpu(), "same": (lp.argmax(-1) == lp_b.argmax(-1)).cpu(),
                          "gap": top2_gap(p1p2).cpu()})
        if save_k is not None:
            saved.append(_summary(lp_b, tgt, save_k))
        if progress is not None:
            progress(w)
    base = _base_from(saved, tokens, windows, base_model.config.vocab_size, source) if saved else None
    return _result(parts, base)
