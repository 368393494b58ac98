"""Recipes: which format each checkpoint tensor gets, as predicates on tensor names (mlx-lm style).

A recipe maps every tensor of a config's inventory to a format name or ``"keep"`` (stays in the
checkpoint dtype).  ``Recipe.plan(cfg)`` returns that map after two rules every recipe obeys:

* **protected roles stay high precision** unless the recipe names them on purpose: the router gate
  and its correction bias, ``A_log``, ``dt_bias``, every norm and the short-conv weights (1-D and
  3-D tensors are never quantized anyway);
* **fallback** when the input width is not a multiple of the format's block, as llama.cpp's
  ``tensor_type_fallback``: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, a
  32-block GGUF type -> f16; an mlx format -> keep (mlx-lm skips such modules).

Built-ins reproduce the published builds (``../shared/reference/quantization-formats.md`` §2.3-2.4,
§3.4): llama.cpp's ftypes ``q2_k q3_k_s q4_k_m q5_k_m mxfp4_moe`` with their per-category rules and
``use_more_bits`` layer spread, mlx-lm's ``mxfp4-g32`` and ``affine4-g64`` (router gates 8-bit
g64), and ``mixed-3.6``.  A recipe file (JSON) is ``{"name", "default", "rules": [{"match": regex,
"format": name}, ...]}``: the first rule whose regex is found in the tensor name wins, then
``default``; a rule that matches a protected tensor quantizes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kimiq.config import ModelConfig

from .formats import get_format

__all__ = ["TensorSpec", "Recipe", "RECIPES", "get_recipe", "load_recipe", "tensor_specs", "plan_bytes", "KEEP",
           "PROTECTED_ROLES", "use_more_bits", "fit_format", "tensor_role"]

KEEP = "keep"
PROTECTED_ROLES = frozenset({"router", "router_bias", "decay", "norm", "conv"})
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
             "q4_0": "f16", "q5_0": "f16", "q5_1": "f16", "q8_0": "f16", "mxfp4": "f16"}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor as a recipe sees it."""

    name: str
    shape: tuple[int, ...]
    layer: int | None  # decoder layer index, None for embeddings / final norm / head
    role: str  # see tensor_role()
    index: int = 0  # llama.cpp's running attn_v counter (role attn_v only)
    count: int = 0  # number of attn_v tensors (role attn_v only)


def tensor_role(name: str) -> str:
    leaf = name.rsplit(".", 2)
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norm"
    if name.endswith("_conv1d.weight"):
        return "conv"
    if name.endswith(("A_log", "dt_bias")):
        return "decay"
    if name.endswith("block_sparse_moe.gate.weight"):
        return "router"
    if name.endswith("e_score_correction_bias"):
        return "router_bias"
    if ".experts." in name:
        return {"w1": "exp_gate", "w3": "exp_up", "w2": "exp_down"}[leaf[-2]]
    if ".shared_experts." in name:
        return {"gate_proj": "shexp_gate", "up_proj": "shexp_up", "down_proj": "shexp_down"}[leaf[-2]]
    if ".mlp." in name:
        return {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf[-2]]
    proj = leaf[-2]
    return {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o",
            "kv_a_proj_with_mqa": "attn_kv_a", "kv_b_proj": "attn_kv_b", "b_proj": "kda_beta",
            "f_a_proj": "kda_f", "f_b_proj": "kda_f", "g_a_proj": "kda_g", "g_b_proj": "kda_g"}.get(proj, "other")


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The inventory of ``cfg`` with roles, in checkpoint (layer) order."""
    from kimiq.model.weights import checkpoint_inventory

    specs = []
    for name, shape in checkpoint_inventory(cfg).items():
        m = _LAYER.match(name)
        specs.append(TensorSpec(name, tuple(shape), int(m[1]) if m else None, tensor_role(name)))
    # llama.cpp counts attn_v tensors (here: the KDA v_proj; MLA's kv_b becomes attn_k_b/attn_v_b in GGUF)
    v_idx = [i for i, s in enumerate(specs) if s.role == "attn_v"]
    for k, i in enumerate(v_idx):
        s = specs[i]
        specs[i] = TensorSpec(s.name, s.shape, s.layer, s.role, k, len(v_idx))
    return specs


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp / mlx-lm: the first and last eighth of the layers and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Chooser = Callable[[TensorSpec, ModelConfig], "str | None"]


@dataclass(frozen=True)
class Recipe:
    """``choose(spec, cfg)`` -> a format name, ``"keep"``, or None for "not my business" (= keep)."""

    name: str
    doc: str
    choose: Chooser = field(repr=False)
    quantizes_protected: bool = False  # True: choose() decides protected roles too

    def plan(self, cfg: ModelConfig) -> dict[str, str]:
        """Every inventory tensor -> its format name or "keep"."""
        out = {}
        for s in tensor_specs(cfg):
            fmt = None
            if len(s.shape) == 2 and (self.quantizes_protected or s.role not in PROTECTED_ROLES):
                fmt = self.choose(s, cfg)
            out[s.name] = fit_format(fmt or KEEP, s.shape)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "doc": self.doc}


def fit_format(fmt: str, shape: tuple[int, ...]) -> str:
    """``fmt`` if it takes rows of ``shape[-1]``, else llama.cpp's fallback chain (ending at f16 / keep)."""
    while fmt != KEEP and not get_format(fmt).supports(shape):
        fmt = _FALLBACK.get(fmt, KEEP)
    return fmt


# ----------------------------------------------------------------------------- llama.cpp ftypes


def _llama(default: str, rules: Callable[[TensorSpec, int], str | None], output: str = "q6_k") -> Chooser:
    def choose(s: TensorSpec, cfg: ModelConfig) -> str | None:
        if s.role == "lm_head":
            return output
        if s.role == "embed":
            return default
        return rules(s, cfg.num_hidden_layers) or default

    return choose


def _q4_k_m(s: TensorSpec, n: int) -> str | None:
    if s.role == "attn_v" and use_more_bits(s.index, s.count):
        return "q6_k"
    if s.role in ("ffn_down", "shexp_down", "exp_down") and use_more_bits(s.layer, n):
        return "q6_k"
    return None


def _q5_k_m(s: TensorSpec, n: int) -> str | None:
    return "q6_k" if _q4_k_m(s, n) else None


def _q2_k(s: TensorSpec, n: int) -> str | None:
    # n_gqa = 1 for Kimi-Linear (KDA heads == kv heads), so attn_v gets Q3_K, not Q4_K
    return "q3_k" if s.role in ("attn_v", "ffn_down", "shexp_down", "exp_down", "attn_o") else None


def _mxfp4_moe(s: TensorSpec, cfg: ModelConfig) -> str | None:
    if s.role == "lm_head":
        return "q8_0"
    # llama.cpp: 3-D tensors (stacked experts, and MLA's attn_k_b / attn_v_b that GGUF splits kv_b_proj into)
    # -> MXFP4; every other quantizable tensor -> Q8_0
    return "mxfp4" if s.role in ("exp_gate", "exp_up", "exp_down", "attn_kv_b") else "q8_0"


# ----------------------------------------------------------------------------- mlx-lm and kimiq mixes


def _mlx(fmt: str) -> Chooser:
    def choose(s: TensorSpec, cfg: ModelConfig) -> str | None:
        if s.role == "router":
            return "affine8-g64"  # mlx-lm kimi_linear quant_predicate
        if s.role in PROTECTED_ROLES:
            return None
        return fmt

    return choose


def _mixed_36(s: TensorSpec, cfg: ModelConfig) -> str | None:
    if s.role in ("exp_gate", "exp_up"):
        return "affine3-g64"
    if s.role == "exp_down":
        return "affine4-g64" if use_more_bits(s.layer, cfg.num_hidden_layers) else "affine3-g64"
    return "affine6-g64"  # attention, KDA projections, shared expert, dense MLP, embeddings, head


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("q4_k_m", "llama.cpp Q4_K_M: Q4_K, Q6_K for lm_head and for attn_v / ffn_down on use_more_bits layers",
           _llama("q4_k", _q4_k_m)),
    Recipe("q5_k_m", "llama.cpp Q5_K_M: Q5_K, Q6_K for lm_head and for attn_v / ffn_down on use_more_bits layers",
           _llama("q5_k", _q5_k_m)),
    Recipe("q3_k_s", "llama.cpp Q3_K_S: Q3_K everywhere, Q6_K lm_head", _llama("q3_k", lambda s, n: None)),
    Recipe("q2_k", "llama.cpp Q2_K: Q2_K, Q3_K for attn_v / attn_output / ffn_down, Q6_K lm_head",
           _llama("q2_k", _q2_k)),
    Recipe("mxfp4_moe", "llama.cpp MXFP4_MOE: routed experts (and MLA k_b/v_b) MXFP4, everything else Q8_0",
           _mxfp4_moe),
    Recipe("mxfp4-g32", "mlx-lm MXFP4 group 32 (mlx scale rule), router gates affine 8-bit g64", _mlx("mxfp4-mlx"),
           quantizes_protected=True),
    Recipe("affine4-g64", "mlx-lm default: affine 4-bit g64, router gates affine 8-bit g64", _mlx("affine4-g64"),
           quantizes_protected=True),
    Recipe("mixed-3.6", "routed experts affine 3-bit g64 (down_proj 4-bit on use_more_bits layers); attention, "
           "shared expert, dense MLP, embeddings and head 6-bit g64; router bf16", _mixed_36),
    Recipe("q8_0", "Q8_0 for every quantizable tensor", lambda s, cfg: "q8_0"),
]}  # fmt: skip


def get_recipe(name_or_file: str | Path) -> Recipe:
    """A built-in recipe by name, or a JSON recipe file."""
    if str(name_or_file) in RECIPES:
        return RECIPES[str(name_or_file)]
    p = Path(name_or_file)
    if p.suffix == ".json" or p.is_file():
        return load_recipe(p)
    raise KeyError(f"unknown recipe {name_or_file!r}; built-ins: {', '.join(RECIPES)} (or a .json recipe file)")


def load_recipe(path: str | Path) -> Recipe:
    """``{"name", "default", "rules": [{"match": regex, "format": name}]}`` -> Recipe (validated now, not later)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"recipe file {p}: {e}") from None
    unknown = set(d) - {"name", "doc", "default", "rules"}
    if unknown or not isinstance(d.get("rules", []), list):
        raise ValueError(f"recipe file {p}: unknown keys {sorted(unknown)} (expected name, doc, default, rules)")
    default = d.get("default", KEEP)
    rules = []
    for i, r in enumerate(d.get("rules", [])):
        if not isinstance(r, dict) or set(r) != {"match", "format"}:
            raise ValueError(f"recipe file {p}: rule {i} must be {{\"match\": regex, \"format\": name}}, got {r!r}")
        try:
            rules.append((re.compile(r["match"]), r["format"]))
        except re.error as e:
            raise ValueError(f"recipe file {p}: rule {i}: bad regex {r['match']!r}: {e}") from None
    for fmt in [default] + [f for _, f in rules]:
        if fmt != KEEP:
            get_format(fmt)  # KeyError names the unknown format

    def choose(s: TensorSpec, cfg: ModelConfig) -> str | None:
        for rx, fmt in rules:
            if rx.search(s.name):
                return fmt
        return None if s.role in PROTECTED_ROLES else default

    return Recipe(d.get("name", p.stem), d.get("doc", f"rules from {p.name}"), choose, quantizes_protected=True)


def kept_bits(cfg: ModelConfig, name: str) -> int:
    """Bits per weight of checkpoint tensor ``name`` kept unquantized: the checkpoint dtype, fp32 for the tensors
    kimiq keeps in fp32."""
    from kimiq.model.model import keep_fp32

    return 32 if keep_fp32(name) else 16 if cfg.dtype in ("bfloat16", "float16") else 32


def plan_bytes(cfg: ModelConfig, plan: dict[str, str], keep_bits: Callable[[TensorSpec], int] | None = None):
    """(total bytes, parameter count) of a plan; kept tensors at ``keep_bits(spec)`` (default ``kept_bits``)."""
    keep_bits = keep_bits or (lambda s: kept_bits(cfg, s.name))
    total, params = 0, 0
    for s in tensor_specs(cfg):
        n = 1
        for d in s.shape:
            n *= d
        params += n
        fmt = plan[s.name]
        total += (n * keep_bits(s) + 7) // 8 if fmt == KEEP else get_format(fmt).nbytes((n // s.shape[-1], s.shape[-1]))
    return total, params
