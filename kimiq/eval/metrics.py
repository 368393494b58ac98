"""Quality metrics of a (quantized) model against a base model: pure tensor functions, no model calls.

Conventions follow llama.cpp's ``llama-perplexity`` (``ggml-org/llama.cpp:tools/perplexity/perplexity.cpp``)
as written down in ``../shared/reference/quantization-formats.md`` §6, so the printed numbers can be read
next to llama.cpp's.  Per scored position ``t`` (``N`` positions; tensors are ``[N]`` or ``[N, V]``):

    nll_t   = -log softmax(logits_t)[tok_t]                       (nats)
    PPL     = exp(<nll>)  +-  PPL * unc(nll)                       (delta method, §6.1)
    KLD_t   = sum_i p_i (log p_i - log q_i)                        (p = base, q = model; KL(base || model))
    dp_t    = q(tok_t) - p(tok_t)                                  (probability of the actual next token)
    same_t  = argmax q_t == argmax p_t                             (first index on ties)

``unc`` is llama.cpp's ``mean_and_uncertainty`` (§6.2): ``unc(x) = sqrt((<x^2> - <x>^2) / (N-1))``, i.e. the
standard error of the mean with the population variance, set to 0 when ``N <= 10`` or the variance is not
positive.  Tokens are treated as independent; windows make them correlated, so the SEs are optimistic
(llama.cpp's choice, kept for comparable numbers).

Top-k base distributions (what ``kimiq eval kld --save-base-logits`` stores): llama.cpp keeps every vocab
entry as a uint16 code over ``[max - 16, max]`` and sums KLD only over base tokens with ``log p > -16``
(§6.2), a truncated sum that can go slightly negative.  kimiq keeps the base's ``k`` most likely tokens
exactly (fp32 log-probs) plus the log of the remaining mass ``R`` and adds that mass as one bucket::

    KLD_t ~ sum_{i in top-k} p_i (log p_i - log q_i)  +  p_R (log p_R - log q_R),   q_R = 1 - sum_{i in top-k} q_i

This is the exact KL of the two distributions with the tail merged into one outcome: never negative, a
lower bound of the full KL (merging outcomes cannot raise a KL divergence), and equal to it when ``k = V``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["NEAR_TIE", "token_nll", "mean_and_uncertainty", "perplexity_and_se", "percentile", "kl_divergence",
           "topk_summary", "kl_divergence_topk", "top2_gap", "KldReport", "kld_report"]

NEAR_TIE = 0.05  # a flip is a "near-tie" when the base's top-2 probabilities differ by less than this (kimiq's choice)


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logprobs [N, V] (log_softmax), targets [N] -> nll [N]."""
    return -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def mean_and_uncertainty(x: torch.Tensor) -> tuple[float, float]:
    """llama.cpp's ``mean_and_uncertainty``: (mean, sqrt((<x^2> - <x>^2) / (N-1))), the latter 0 unless N > 10."""
    x = x.double().flatten()
    n = x.numel()
    if n == 0:
        return float("nan"), 0.0
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if n > 10 and var > 0 else 0.0


def perplexity_and_se(nll: torch.Tensor) -> tuple[float, float]:
    """PPL = exp(<nll>) and its standard error PPL * unc(nll) (delta method; llama.cpp's ``Final estimate``)."""
    mean, unc = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return ppl, ppl * unc


def percentile(x: torch.Tensor, f: float) -> float:
    """llama.cpp's percentile: linear interpolation in the sorted values at ``p = f * (N-1)``."""
    s = x.double().flatten().sort().values
    if s.numel() == 0:
        return float("nan")
    p = f * (s.numel() - 1)
    lo = math.floor(p)
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (p - lo) * (s[hi] - s[lo]))


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(base || model) per position: [N, V] log-probs each -> [N] nats.  0 * log 0 counts as 0."""
    p = base_logprobs.exp()
    d = torch.where(p > 0, p * (base_logprobs - logprobs), torch.zeros_like(p))
    return d.double().sum(-1)


def topk_summary(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] log-probs -> (top-k log-probs [N, k] fp32, their ids [N, k] int32, log of the rest [N] fp32).

    The rest is ``logsumexp`` over the ids not kept (-inf when ``k = V``), computed from the full
    distribution, not as ``log(1 - sum top-k)``, so a rest of 1e-12 keeps its digits.
    """
    k = min(k, logprobs.shape[-1])
    top, ids = logprobs.topk(k, dim=-1)  # sorted, so [:, 0] is the argmax
    rest = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return top.float(), ids.int(), rest.float()


def kl_divergence_topk(top: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor,
                       logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || model) with the base known as ``topk_summary``: the top-k terms + the rest as one bucket.

    top/ids [N, k], rest [N] (base); logprobs [N, V] (model, full) -> [N] nats; see the module docstring.
    """
    lq = logprobs.double()
    lq_top = lq.gather(-1, ids.long())
    lq_rest = lq.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)
    lp_top, lp_rest = top.double(), rest.double()
    head = (lp_top.exp() * (lp_top - lq_top)).sum(-1)
    p_rest = lp_rest.exp()
    tail = torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
    return head + tail


def top2_gap(top: torch.Tensor) -> torch.Tensor:
    """p1 - p2 of sorted top log-probs [N, k >= 2] (the base's margin at its argmax) -> [N]."""
    p = top[..., :2].double().exp()
    return p[..., 0] - p[..., 1]


@dataclass(frozen=True)
class KldReport:
    """Summary of a model against a base on the same positions (llama.cpp's KL-divergence printout + flips)."""

    n: int
    ppl: float  # model
    ppl_se: float
    ppl_base: float
    ppl_base_se: float
    cor_ln_ppl: float  # correlation of the per-token nll of model and base
    ln_ratio: float  # <nll> - <nll_base> = ln(PPL / PPL_base)
    ln_ratio_se: float
    ratio: float
    ratio_se: float
    ppl_diff: float
    ppl_diff_se: float
    kld_mean: float
    kld_se: float
    kld_max: float
    kld_p99: float
    kld_p90: float
    kld_median: float
    dp_mean: float  # fractions (printed x 100 %)
    dp_mean_se: float
    rms_dp: float
    rms_dp_se: float
    same_top: float
    same_top_se: float
    n_flips: int
    kld_flipped_mean: float  # mean KLD over flipped positions (nan without flips)
    near_tie_share: float  # flips whose base top-2 gap < near_tie (nan without flips)
    near_tie: float = NEAR_TIE

    @property
    def flip_rate(self) -> float:
        return 1.0 - self.same_top

    def to_dict(self) -> dict:
        return asdict(self) | {"flip_rate": self.flip_rate}

    def __str__(self) -> str:
        pct = 100.0

        def line(name: str, v: float, se: float | None = None, scale: float = 1.0, unit: str = "") -> str:
            s = f"{name:<31}: {v * scale:10.6f}"
            return s + (f" ± {se * scale:10.6f}" if se is not None else "") + unit

        rows = [
            f"====== Perplexity statistics ({self.n:,} positions) ======",
            line("Mean PPL(Q)", self.ppl, self.ppl_se),
            line("Mean PPL(base)", self.ppl_base, self.ppl_base_se),
            line("Cor(ln(PPL(Q)), ln(PPL(base)))", self.cor_ln_ppl, scale=pct, unit=" %"),
            line("Mean ln(PPL(Q)/PPL(base))", self.ln_ratio, self.ln_ratio_se),
            line("Mean PPL(Q)/PPL(base)", self.ratio, self.ratio_se),
            line("Mean PPL(Q)-PPL(base)", self.ppl_diff, self.ppl_diff_se),
            "",
            "====== KL divergence statistics ======",
            line("Mean    KLD", self.kld_mean, self.kld_se),
            line("Maximum KLD", self.kld_max),
            line("99.0%   KLD", self.kld_p99),
            line("90.0%   KLD", self.kld_p90),
            line("Median  KLD", self.kld_median),
            "",
            "====== Token probability statistics ======",
            line("Mean    Δp", self.dp_mean, self.dp_mean_se, pct, " %"),
            line("RMS Δp", self.rms_dp, self.rms_dp_se, pct, " %"),
            line("Same top p", self.same_top, self.same_top_se, pct, " %"),
            f"{'Top-1 flips':<31}: {self.n_flips:10d}  ({self.flip_rate * pct:.3f} %)",
            line("Mean KLD on flips", self.kld_flipped_mean),
            line(f"Flips at near-ties (gap<{self.near_tie:g})", self.near_tie_share, scale=pct, unit=" %"),
        ]
        return "\n".join(rows)


def kld_report(kld: torch.Tensor, nll: torch.Tensor, nll_base: torch.Tensor, same_top: torch.Tensor,
               base_gap: torch.Tensor, near_tie: float = NEAR_TIE) -> KldReport:
    """Aggregate per-position tensors [N] (KLD, model nll, base nll, same argmax, base top-2 gap) with
    llama.cpp's formulas (quantization-formats.md §6.2) plus kimiq's flip statistics."""
    n = kld.numel()
    nll, nll_base = nll.double(), nll_base.double()
    m, u = mean_and_uncertainty(nll)
    mb, ub = mean_and_uncertainty(nll_base)
    cov = (float((nll * nll_base).mean()) - m * mb) / (n - 1) if n > 1 else 0.0
    cor = cov / (u * ub) if u > 0 and ub > 0 else float("nan")
    ppl, ppl_b = math.exp(m), math.exp(mb)
    ln_ratio = m - mb
    ln_ratio_se = math.sqrt(max(u * u + ub * ub - 2 * cov, 0.0))
    ratio = math.exp(ln_ratio)
    diff_se = math.sqrt(max((ppl * u) ** 2 + (ppl_b * ub) ** 2 - 2 * ppl * ppl_b * cov, 0.0))
    kld_mean, kld_se = mean_and_uncertainty(kld)
    dp = (-nll).exp() - (-nll_base).exp()
    dp_mean, dp_se = mean_and_uncertainty(dp)
    dp2_mean, dp2_se = mean_and_uncertainty(dp * dp)
    rms = math.sqrt(dp2_mean)
    same = float(same_top.double().mean()) if n else float("nan")
    flips = ~same_top.bool()
    n_flips = int(flips.sum())
    return KldReport(
        n=n, ppl=ppl, ppl_se=ppl * u, ppl_base=ppl_b, ppl_base_se=ppl_b * ub, cor_ln_ppl=cor,
        ln_ratio=ln_ratio, ln_ratio_se=ln_ratio_se, ratio=ratio, ratio_se=ratio * ln_ratio_se,
        ppl_diff=ppl - ppl_b, ppl_diff_se=diff_se,
        kld_mean=kld_mean, kld_se=kld_se, kld_max=percentile(kld, 1.0), kld_p99=percentile(kld, 0.99),
        kld_p90=percentile(kld, 0.90), kld_median=percentile(kld, 0.5),
        dp_mean=dp_mean, dp_mean_se=dp_se, rms_dp=rms, rms_dp_se=0.5 / rms * dp2_se if rms > 0 else 0.0,
        same_top=same, same_top_se=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        n_flips=n_flips,
        kld_flipped_mean=float(kld.double()[flips].mean()) if n_flips else float("nan"),
        near_tie_share=float((base_gap.double()[flips] < near_tie).double().mean()) if n_flips else float("nan"),
        near_tie=near_tie,
    )
