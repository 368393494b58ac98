"""Sensitivity-graded recipes: measure what quantizing each weight group costs, then spend bits where they pay.

    sens = measure_sensitivity(model, calibration_tokens(tok, 2048), LADDERS["gguf"])
    plan = auto_plan(model.config, sens, budget_bytes(model.config, target_bpw=4.9), LADDERS["gguf"])
    quantize_auto(src, out, target_bpw=4.9, family="gguf")      # all of it + the checkpoint (kimiq quantize)

**Groups.**  Every quantizable checkpoint tensor (2-D, not a protected role: router gate and bias,
``A_log``, ``dt_bias``, norms, short convs stay as they are) belongs to one group: a layer's ``q_proj``,
``o_proj``, shared-expert ``down_proj``, ``embed_tokens``, ``lm_head`` ... are groups of one tensor; the
routed experts of one projection in one layer (``experts.*.w1``) are one group, because ``QuantExperts``
stores all experts of a projection in one format.

**Sensitivity.**  On calibration tokens (the train or validation split, never the test split that
``kimiq eval`` scores) the full-precision model's log-probs are computed once.  Then for every group
and every candidate format of the ladder (after ``fit_format``'s llama.cpp fallback for widths the
format cannot take, so e.g. a 64-wide ``f_b_proj`` gets Q4_0 for Q2_K), that group *alone* is replaced
in place by its dequantized values (quantized from the checkpoint dtype, so the values are the stored
ones), the model is re-run and ``ΔKL = mean_t KL(p_full(t) || p_quant(t))`` recorded; then the weights
are put back.  Each (tensor, format) is quantized once.  The hidden state entering each decoder layer
is cached, so a group in layer ``L`` re-runs only layers ``L..`` and the head.  Keeping a group in the
checkpoint dtype is always an option, at ΔKL 0.

**Allocation.**  The predicted KL of a plan is the sum of its groups' ΔKL: the additivity assumption.
It holds to second order when the groups' quantization errors are small and uncorrelated (KL ≈
½ δᵀFδ with F the Fisher matrix; the cross terms between groups average out), and it is what makes the
search separable.  ``kimiq.quant.allocate`` then picks one option per group minimising the predicted
sum under the byte budget (``plan_bytes``: every tensor counted, kept ones at their stored dtype), as an
exact multiple-choice knapsack.

**Output** (``quantize_auto``, ``kimiq quantize --target-bpw B``): the plan as a recipe file (one explicit
rule per group, loadable by ``load_recipe``) and the predictions (per group: format, bytes, ΔKL of every
candidate; totals) are written into the checkpoint directory as ``kimiq_recipe.json`` /
``kimiq_sensitivity.json`` (hashed in ``SHA256SUMS``); ``quantization_config`` names the recipe.  A
predictions file can be passed back (``sensitivity=``) to allocate another budget without re-measuring.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kimiq.config import ModelConfig

from .allocate import Allocation, Option, allocate
from .formats import get_format
from .recipes import KEEP, PROTECTED_ROLES, fit_format, kept_bits, load_recipe, plan_bytes, tensor_specs

__all__ = [
    "LADDERS",
    "PREDICTIONS_FILE",
    "RECIPE_FILE",
    "AutoPlan",
    "Group",
    "Sensitivity",
    "auto_plan",
    "budget_bytes",
    "calibration_tokens",
    "measure_sensitivity",
    "quantize_auto",
    "weight_groups",
]

_GGUF = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
_MLX = tuple(f"affine{b}-g64" for b in (2, 3, 4, 5, 6, 8))
LADDERS: dict[str, tuple[str, ...]] = {"gguf": _GGUF, "mlx": _MLX, "all": _GGUF + _MLX}
RECIPE_FILE = "kimiq_recipe.json"
PREDICTIONS_FILE = "kimiq_sensitivity.json"
_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class Group:
    """Checkpoint tensors that get one format together (all of the same shape)."""

    name: str  # the tensor name, or with ``experts.*.`` for the routed experts of one projection
    tensors: tuple[str, ...]
    shape: tuple[int, int]
    layer: int | None
    role: str

    @property
    def n_weights(self) -> int:
        return len(self.tensors) * self.shape[0] * self.shape[1]

    @property
    def pattern(self) -> str:
        """The recipe-rule regex matching exactly this group's tensors."""
        return "^" + re.escape(self.name).replace(r"\*", r"\d+") + "$"

    def candidates(self, ladder: Sequence[str]) -> list[str]:
        """The ladder's formats as this shape stores them (``fit_format``), then "keep"; no repeats."""
        return list(dict.fromkeys([fit_format(f, self.shape) for f in ladder] + [KEEP]))


def weight_groups(cfg: ModelConfig) -> list[Group]:
    """The groups of ``cfg`` in checkpoint order (protected and non-2-D tensors are in none)."""
    found: dict[str, list] = {}
    for s in tensor_specs(cfg):
        if len(s.shape) != 2 or s.role in PROTECTED_ROLES:
            continue
        key = _EXPERT.sub(".experts.*.", s.name)
        found.setdefault(key, [s.layer, s.role, s.shape, []])[3].append(s.name)
    return [Group(k, tuple(names), tuple(shape), layer, role) for k, (layer, role, shape, names) in found.items()]


def _group_bytes(cfg: ModelConfig, g: Group, fmt: str) -> int:
    n = g.shape[0] * g.shape[1]
    if fmt == KEEP:
        return sum((n * kept_bits(cfg, t) + 7) // 8 for t in g.tensors)
    return len(g.tensors) * get_format(fmt).nbytes(g.shape)


# ----------------------------------------------------------------------------------------------- measurement
def calibration_tokens(tokenizer, n_tokens: int = 2048, split: str = "validation", ctx: int = 512) -> torch.Tensor:
    """``[n_tokens // ctx, ctx]`` windows, each from the start of other files spread over ``split``."""
    from kimiq.eval.ppl import token_stream
    from kimiq.train.data import read_source, split_files

    if split == "test":
        raise ValueError("calibrate on the train or validation split; the test split is kimiq eval's held-out set")
    ctx = min(ctx, n_tokens)
    n_win = max(1, n_tokens // ctx)
    files = split_files(split)
    step = max(1, len(files) // (2 * n_win))
    order = files[::step] + [f for i, f in enumerate(files) if i % step]
    stream, windows = torch.zeros(0, dtype=torch.long), []
    for _, path in order:
        if (text := read_source(path)) is None:
            continue
        stream = torch.cat([stream, token_stream(tokenizer, [text[: 16 * ctx]])[:ctx]])
        while stream.numel() >= ctx and len(windows) < n_win:
            windows.append(stream[:ctx])
            stream = stream[ctx:]
        if len(windows) == n_win:
            break
    if not windows:
        raise ValueError(f"the {split} split has fewer than {ctx} tokens")
    return torch.stack(windows)


@dataclass(frozen=True)
class Sensitivity:
    """ΔKL (nats/token, mean over the calibration positions) of quantizing each group alone to each format."""

    dkl: dict[str, dict[str, float]]  # group name -> format -> ΔKL
    n_tokens: int
    split: str
    imatrix: bool
    seconds: float

    def to_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "split": self.split, "imatrix": self.imatrix, "seconds": self.seconds,
                "dkl": self.dkl}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        d = d.get("sensitivity", d)  # a predictions file, or the sensitivity part of one
        return cls({g: dict(v) for g, v in d["dkl"].items()}, int(d["n_tokens"]), d["split"], bool(d["imatrix"]),
                   float(d.get("seconds", 0.0)))


def _slot(model, name: str) -> torch.Tensor:
    """The model tensor (a view for one expert's rows) holding checkpoint tensor ``name``."""
    from kimiq.model.weights import _internal

    iname, row = _internal(name)
    holder, _, leaf = iname.rpartition(".")
    t = getattr(model.get_submodule(holder), leaf)
    return t[row] if row is not None else t


def _mean_kl(model, base: torch.Tensor, x: torch.Tensor) -> float:
    """Mean KL(base || model's head on final hidden ``x``) over all positions; ``base`` [B, T, V] log-probs."""
    from kimiq.eval.metrics import kl_divergence

    total = 0.0
    for b in range(x.shape[0]):  # one window at a time: [T, V] at most
        lp = torch.log_softmax(model.lm_head(model.model.norm(x[b])).float(), dim=-1)
        total += float(kl_divergence(base[b], lp).sum())
    return total / (x.shape[0] * x.shape[1])


@torch.no_grad()
def measure_sensitivity(model, tokens: torch.Tensor, ladder: Sequence[str], *, groups: Sequence[Group] | None = None,
                        imatrix: dict[str, torch.Tensor] | None = None, split: str = "validation",
                        progress: bool = True) -> Sensitivity:
    """ΔKL of every group x candidate format (see the module docstring); ``tokens`` [B, T], each row a window.

    ``model`` is the full-precision model (fp32 compute recommended); its weights are changed and restored.
    """
    from tqdm.auto import tqdm

    from kimiq.model.weights import _as_dtype

    t0 = time.perf_counter()
    cfg = model.config
    src_dtype = _as_dtype(cfg.dtype)
    groups = list(groups) if groups is not None else weight_groups(cfg)
    layers = model.model.layers
    ids = tokens.to(model.device)
    hidden = [model.model.embed_tokens(ids)]  # hidden[i]: input of layer i; hidden[-1]: before the final norm
    for layer in layers:
        hidden.append(layer(hidden[-1]))
    x = hidden[-1]
    base = torch.stack([torch.log_softmax(model.lm_head(model.model.norm(x[b])).float(), -1) for b in range(len(x))])

    def run(g: Group) -> float:
        if g.role == "embed":
            start, h = 0, model.model.embed_tokens(ids)
        elif g.role == "lm_head":
            start, h = len(layers), hidden[-1]
        else:
            start, h = g.layer, hidden[g.layer]
        for layer in layers[start:]:
            h = layer(h)
        return _mean_kl(model, base, h)

    jobs = [(g, f) for g in groups for f in g.candidates(ladder) if f != KEEP]
    dkl: dict[str, dict[str, float]] = {g.name: {KEEP: 0.0} for g in groups}
    bar = tqdm(total=len(jobs), desc="sensitivity", unit="run", dynamic_ncols=True, disable=not progress)
    for g, fmt in jobs:
        slots = [_slot(model, t) for t in g.tensors]
        saved = [s.clone() for s in slots]
        F = get_format(fmt)
        for name, s in zip(g.tensors, slots):
            w = s.detach().to("cpu", src_dtype)  # quantized from the stored values, as the checkpoint writer does
            s.copy_(F.dequantize(F.quantize(w, imatrix.get(name) if imatrix else None), g.shape).to(s.dtype))
        try:
            dkl[g.name][fmt] = run(g)
        finally:
            for s, v in zip(slots, saved):
                s.copy_(v)
        bar.update(1)
    bar.close()
    return Sensitivity(dkl, int(tokens.numel()), split, imatrix is not None, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- allocation
def budget_bytes(cfg: ModelConfig, target_bpw: float | None = None, target_size_gb: float | None = None) -> int:
    """The byte budget of a target in bits per weight (every tensor counted) or decimal GB."""
    if (target_bpw is None) == (target_size_gb is None):
        raise ValueError("give exactly one of target_bpw, target_size_gb")
    if target_size_gb is not None:
        return int(target_size_gb * 1e9)
    _, n = plan_bytes(cfg, {s.name: KEEP for s in tensor_specs(cfg)})
    return int(target_bpw * n / 8)


@dataclass(frozen=True)
class AutoPlan:
    """An allocation over the groups, with what it predicts."""

    groups: tuple[Group, ...]
    allocation: Allocation
    options: dict[str, list[Option]]
    fixed_bytes: int  # tensors in no group, at their stored dtype
    n_params: int
    family: str
    sensitivity: Sensitivity

    @property
    def nbytes(self) -> int:
        return self.fixed_bytes + self.allocation.nbytes

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.n_params

    @property
    def formats(self) -> dict[str, str]:
        """Group name -> chosen format."""
        return {g: o.format for g, o in self.allocation.choice.items()}

    def name(self) -> str:
        return f"auto-{self.family}-{self.bpw:.2f}bpw"

    def recipe_json(self) -> dict:
        s = self.sensitivity
        doc = (f"sensitivity-graded ({self.family} ladder, {s.n_tokens} calibration tokens of the {s.split} split"
               f"{', imatrix' if s.imatrix else ''}): predicted mean KLD {self.allocation.dkl:.5f}; "
               f"rules in {RECIPE_FILE}, predictions in {PREDICTIONS_FILE}")
        return {"name": self.name(), "doc": doc, "default": KEEP,
                "rules": [{"match": g.pattern, "format": self.formats[g.name]} for g in self.groups]}

    def predictions(self) -> dict:
        a = self.allocation
        return {
            "recipe": self.name(), "family": self.family, "ladder": list(LADDERS.get(self.family, ())),
            "assumption": "additive: predicted mean KLD = sum of the groups' measured ΔKL, each quantized alone",
            "budget_bytes": a.budget, "bytes": self.nbytes, "fixed_bytes": self.fixed_bytes,
            "n_params": self.n_params, "bpw": round(self.bpw, 4), "predicted_kld": a.dkl,
            "groups": [{"group": g.name, "tensors": len(g.tensors), "weights": g.n_weights,
                        "format": a.choice[g.name].format, "bytes": a.choice[g.name].nbytes,
                        "dkl": a.choice[g.name].dkl} for g in self.groups],
            "sensitivity": self.sensitivity.to_dict(),
        }


def auto_plan(cfg: ModelConfig, sens: Sensitivity, budget: int, ladder: Sequence[str], family: str = "",
              resolution: int = 1 << 16) -> AutoPlan:
    """The least-predicted-KL choice of formats over the groups of ``cfg`` within ``budget`` bytes in all."""
    groups = tuple(weight_groups(cfg))
    options, missing = {}, []
    for g in groups:
        measured = sens.dkl.get(g.name, {})
        missing += [f"{g.name}: {f}" for f in g.candidates(ladder) if f not in measured]
        options[g.name] = [Option(f, _group_bytes(cfg, g, f), max(measured[f], 0.0))
                           for f in g.candidates(ladder) if f in measured]
    if missing:
        raise ValueError(f"sensitivities not measured for {len(missing)} group/format pairs, e.g. {missing[:3]}")
    total_keep, n_params = plan_bytes(cfg, {s.name: KEEP for s in tensor_specs(cfg)})
    fixed = total_keep - sum(_group_bytes(cfg, g, KEEP) for g in groups)
    if budget < fixed:
        raise ValueError(f"budget {budget:,} bytes is below the unquantizable tensors' {fixed:,} bytes")
    try:
        alloc = allocate(options, budget - fixed, resolution)
    except ValueError as e:
        floor = fixed + sum(min(o.nbytes for o in opts) for opts in options.values())
        raise ValueError(f"{e}; the smallest plan of this ladder is {8 * floor / n_params:.3f} bits per weight "
                         f"({floor:,} bytes)") from None
    alloc = Allocation(alloc.choice, budget)
    return AutoPlan(groups, alloc, options, fixed, n_params, family or "custom", sens)


# ----------------------------------------------------------------------------------------------- the verb
def quantize_auto(src: str | Path, out: str | Path, *, target_bpw: float | None = None,
                  target_size_gb: float | None = None, family: str = "gguf", calib_tokens: int = 2048,
                  calib_split: str = "validation", imatrix: dict[str, torch.Tensor] | None = None,
                  sensitivity: str | Path | Sensitivity | None = None, overwrite: bool = False, device: str = "cpu",
                  progress: bool = True, log: Callable[[str], None] = print) -> AutoPlan:
    """Measure (or read) sensitivities of ``src``, allocate the budget, write the checkpoint ``out`` with
    the recipe and predictions files in it.  Returns the plan."""
    from kimiq import load

    from .checkpoint import quantize_checkpoint

    if family not in LADDERS:
        raise ValueError(f"family must be one of {sorted(LADDERS)}, got {family!r}")
    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_file(src)
    budget = budget_bytes(cfg, target_bpw, target_size_gb)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    if isinstance(sensitivity, (str, Path)):
        sensitivity = Sensitivity.from_dict(json.loads(Path(sensitivity).read_text()))
        log(f"sensitivities from {len(sensitivity.dkl)} groups ({sensitivity.n_tokens} tokens) read, not measured")
    if sensitivity is None:
        model, tok = load(src, dtype=torch.float32, device=device)
        tokens = calibration_tokens(tok, calib_tokens, calib_split)
        sensitivity = measure_sensitivity(model.eval(), tokens, LADDERS[family], imatrix=imatrix, split=calib_split,
                                          progress=progress)
        del model
        log(f"sensitivity pass: {sensitivity.n_tokens} {calib_split} tokens, {sum(map(len, sensitivity.dkl.values()))}"
            f" group/format pairs in {sensitivity.seconds:.0f} s")
    plan = auto_plan(cfg, sensitivity, budget, LADDERS[family], family)
    with tempfile.TemporaryDirectory() as tmp:
        rfile = Path(tmp) / RECIPE_FILE
        rfile.write_text(json.dumps(plan.recipe_json(), indent=1) + "\n")
        recipe = load_recipe(rfile)
        total, _ = plan_bytes(cfg, recipe.plan(cfg))
        if total != plan.nbytes:
            raise RuntimeError(f"recipe file gives {total} bytes, the allocation {plan.nbytes} (a kimiq bug)")
        log(f"{recipe.name}: {plan.bpw:.3f} bpw ({plan.nbytes:,} of {budget:,} bytes), predicted mean KLD "
            f"{plan.allocation.dkl:.5f}")
        extra = {RECIPE_FILE: json.dumps(plan.recipe_json(), indent=1) + "\n",
                 PREDICTIONS_FILE: json.dumps(plan.predictions(), indent=1) + "\n"}
        quantize_checkpoint(src, recipe, out, imatrix=imatrix, overwrite=overwrite, progress=progress, log=log,
                            extra_files=extra)
    return plan
