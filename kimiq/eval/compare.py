"""Compare builds of one model: size, bits per weight, PPL and KL divergence against a base build.

    rows = compare_builds(["full/", "q8_0/", "q4_k_m/"], load, ctx=512, limit_tokens=8192)
    print(markdown(rows)); write_csv(rows, "cmp.csv"); plot(rows, "cmp.png")

The base (the first directory unless given) runs once over the windows of ``kimiq.eval.ppl`` and its
summary is kept in memory (``kimiq.eval.kld.base_logits``; ``top_k=0``: full distributions, exact KL, memory
``N x V x 4`` bytes); then each build runs once, giving its PPL and its KL against the base on the
same positions.

Size = the bytes of the build's ``*.safetensors`` files.  Bits per weight = ``plan_bytes`` of the
build's per-tensor formats (config.json ``quantization_config.formats``; anything else stays in the
checkpoint dtype) x 8 / the number of weights of the full-precision model, every tensor counted.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .kld import base_logits, kld_vs_saved
from .metrics import perplexity_and_se
from .ppl import Windows

__all__ = ["BuildRow", "build_size", "compare_builds", "markdown", "write_csv", "plot", "pareto_front"]


@dataclass(frozen=True)
class BuildRow:
    label: str
    path: str
    recipe: str
    size_bytes: int
    bpw: float
    ppl: float
    ppl_se: float
    kld_mean: float
    kld_se: float
    flip_rate: float
    rms_dp: float  # fraction
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_size(path: str | Path) -> tuple[int, float, str]:
    """(safetensors bytes on disk, bits per weight, recipe name or the checkpoint dtype) of a checkpoint dir."""
    from kimiq.config import ModelConfig
    from kimiq.quant.recipes import KEEP, plan_bytes, tensor_specs

    root = Path(path)
    size = sum(f.stat().st_size for f in root.glob("*.safetensors"))
    cfg = ModelConfig.from_file(root)
    qc = json.loads((root / "config.json").read_text()).get("quantization_config") or {}
    formats = qc.get("formats", {})
    plan = {s.name: formats.get(s.name, KEEP) for s in tensor_specs(cfg)}
    nbytes, n = plan_bytes(cfg, plan)
    return size, 8 * nbytes / n, qc.get("recipe", cfg.dtype)


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


def compare_builds(paths: Sequence[str | Path], load: Callable[[str], tuple], base: str | Path | None = None,
                   tokens_for: Callable[[object], object] | None = None, ctx: int = 512, score: str = "second-half",
                   limit_tokens: int | None = None, top_k: int = 0,
                   progress: Callable[[str, int], Callable] | None = None) -> list[BuildRow]:
    """One row per build (the base first, added if not among ``paths``).

    ``load(path) -> (model, tokenizer)``; ``tokens_for(tokenizer) -> token ids`` (default: the held-out split);
    ``progress(desc, n_windows) -> per-window callback`` (or None).
    """
    from .ppl import heldout_tokens

    builds = [Path(p).resolve() for p in paths]
    base_path = Path(base).resolve() if base is not None else builds[0]
    builds = [base_path] + [b for b in builds if b != base_path]
    labels = _labels(builds)

    model, tok = load(str(base_path))
    tokens = tokens_for(tok) if tokens_for is not None else heldout_tokens(tok, limit_tokens)
    windows = Windows.over(len(tokens), ctx, score, limit_tokens)

    def tick(desc: str):
        return progress(desc, windows.n) if progress is not None else None

    ref = base_logits(model, tokens, windows, k=top_k, source=str(base_path), progress=tick(f"base {labels[0]}"))
    del model
    rows = []
    for label, path in zip(labels, builds):
        size, bpw, recipe = build_size(path)
        if path == base_path:
            ppl, se = perplexity_and_se(ref.nll)
            rows.append(BuildRow(label, str(path), recipe, size, bpw, ppl, se, 0.0, 0.0, 0.0, 0.0, ref.nll.numel()))
            continue
        model, _ = load(str(path))
        r = kld_vs_saved(model, ref, progress=tick(label)).report
        del model
        rows.append(BuildRow(label, str(path), recipe, size, bpw, r.ppl, r.ppl_se, r.kld_mean, r.kld_se, r.flip_rate,
                             r.rms_dp, r.n))
    return rows


def markdown(rows: Sequence[BuildRow]) -> str:
    head = ("| build | recipe | size (MB) | bpw | PPL | mean KLD | flips | RMS Δp |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.label} | {r.recipe} | {r.size_bytes / 1e6:.2f} | {r.bpw:.3f} "
                     f"| {r.ppl:.4f} ± {r.ppl_se:.4f} "
                     f"| {r.kld_mean:.6f} ± {r.kld_se:.6f} | {100 * r.flip_rate:.2f} % | {100 * r.rms_dp:.3f} % |")
    n = rows[0].n_tokens if rows else 0
    return "\n".join(lines) + f"\n\n{n:,} scored tokens; KLD and flips against {rows[0].label if rows else '-'}."


def write_csv(rows: Sequence[BuildRow], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(BuildRow.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow(r.to_dict())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (smaller is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows: Sequence[BuildRow], path: str | Path, title: str | None = None) -> None:
    """PNG: mean KLD (log) vs size, one labelled point per build, the Pareto front as a line; the base
    (KLD 0, not on a log axis) as a dashed vertical line at its size."""
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency of the plot only
        raise ValueError("--plot needs matplotlib (pip install 'kimiq[eval]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [(r.size_bytes / 1e6, r.kld_mean, r) for r in rows if r.kld_mean > 0]
    for x, y, r in pts:
        ax.errorbar(x, y, yerr=r.kld_se or None, fmt="o", color="C0", capsize=2)
        ax.annotate(f"{r.label} ({r.bpw:.2f} bpw)", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front([(x, y) for x, y, _ in pts])
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="C1", label="Pareto front")
    for r in rows:
        if r.kld_mean <= 0:
            ax.axvline(r.size_bytes / 1e6, ls="--", color="gray", label=f"{r.label} (base, KLD 0)")
    if pts:
        ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("mean KL(base || build), nats/token")
    ax.set_title(title or f"mean KLD vs size ({rows[0].n_tokens:,} tokens)" if rows else "")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
