"""Memory planner (``kimiq plan``): what kimiq needs to run a Kimi-Linear model at a context, batch and weight
format, and the longest context / most sequences that fit a memory budget.  Also the measurement that checks it.

Owns the formulas below (pure functions of a ``ModelConfig``), the frozen ``MemoryPlan`` report, ``Planner``
(one model + weight format + dtype + device + prefill chunk), the budget table, and ``measure_prefill`` (peak
RSS of a real chunked prefill on CPU, in a fresh subprocess).  Sizes are bytes; B rows, context S tokens,
prefill chunk C tokens (N = B*C), e = bytes per element of the model dtype (kept weights, activations, caches).

Persistent (``../shared/reference/quantization-formats.md`` §7):

* weights: ``sum over tensors`` of the format's bytes (``kimiq.quant.recipes.plan_bytes``); kept tensors in the
  model dtype, the ``keep_fp32`` ones (A_log, dt_bias, router) in fp32.  On CPU, linears in q4_0 / affine4 (and
  q4_k where the build has no int8-activation kernel for it, ``kimiq.quant.modules.int4_repacked``; out a
  multiple of 64) also keep the repack torch's int4 kernel runs on (0.625 B per weight at g32), made at first use;
  every other quantized linear dequantizes its whole weight per prefill call (a workspace phase).
  A quantized ``kv_b_proj`` is also kept dequantized in the model dtype once MLA's absorbed decode reads it.
* KDA state per row (``model.new_state``): per KDA layer a recurrent state fp32 [H, K, K] plus three conv tap
  buffers [P, W-1] in the model dtype (P = H*K, W = short_conv_kernel_size).  Independent of S.
* MLA latent cache per row and token: per MLA layer (kv_lora_rank R + qk_rope_head_dim) values in the model
  dtype, or ``Planner.cache_dtype`` (``model.cache_dtype``), allocated for the full context up front
  (``new_state(B, capacity=S)``).  A cache in another dtype is read back per MLA layer as a model-dtype copy of
  its S latents during prefill (a workspace term).

Transient, at the peak = the last prefill chunk (largest S), each phase freed before the next layer runs:

* MLA attention (``KimiMLAAttention._expanded``): the whole cached context is decompressed per MLA layer,
  ``kv_b_proj(c)`` [B, S, H, nope+v] and the key ``cat`` [B, S, H, nope+rope] (e each), plus q and the
  [B, C, S] bool mask (none for a first chunk into an empty cache: plain causal).  Then SDPA's fused kernel, no
  [B, H, C, S] tensor: on **CPU** flash attention, which wants equal head dims, so v is zero-padded to the q/k
  one [B, H, S, qk] (e), plus the mask as a float bias [B, C, S] (e) and the padded output [B, H, C, qk] (e); on
  **CUDA** the memory-efficient kernel (unequal dims, no padding): the mask as bool + a float bias and one
  aligned copy (e each) [modelled, not measured: no GPU here].  ``Device.attention = "math"`` models the math
  path (scores, softmax and isneginf mask [B, H, C, S], 9 bytes each), which the CPU took before v was padded.
* KDA chunk (``KimiDeltaAttention`` + ``chunk_kda``): ~``N * P * (3e + 40 [+4 if e < 4])``: three conv outputs
  in e, then fp32 q/k (l2norm), g, the [B, H, n, C, K] reshaped q/k/v/g, G = cumsum(g), the chunk outputs and
  their stack.
* MoE: router fp32 [N, E] x3, the expert-grouped copy of x [N*k, D], the output, the shared expert's
  [N, I_shared] x4, and one expert's [n_e, 3I + D] at n_e = N (worst case).  Dense MLP: [N, I] x4.
* lm_head: [N, V] in e, plus its fp32 copy when e < 4.
* dequantized weight: the largest quantized linear on the reference path, [out, in] in e.
* residual stream: 3 [N, D] in e, alive through every phase.

Plus: the caller's fp32 logits of the previous chunk ([N, V] x 4, as ``kimiq eval`` feeds full-logit chunks;
with ``last_only``, as the engine's prefill, [B, V] x 4 and a [B, V] head); allocator slack, memory the
allocator holds beyond live tensors, as a fraction of the workspace with a floor: CPU 0.2, at least 16 MiB
(glibc keeps freed blocks under its dynamic mmap threshold, up to 32 MiB, in the heap, and BLAS/oneDNN keep
buffers: measured 12-31% on the default model at 2k-16k context with the math attention path, where the tensor
model alone matched the live-tensor peak of torch's memory profiler within 0.2%; with the fused attention the
workspace shrank and the floor shows: 12-28 MiB above the tensors at 2k-4k, varying by ~15 MiB from run to
run), CUDA 0.1 (caching-allocator rounding; an estimate); and a fixed runtime overhead per
device: CPU 400 MiB (Python, torch and kimiq imported and warmed up: ~320 MiB RSS measured with torch 2.13),
CUDA 1 GiB (CUDA context and cuBLAS workspaces; an estimate).

    peak(S) = weights (+ int4 repacks, + kv_b dequantized) + B*kda_state + B*S*mla_per_token + logits_held
              + max(phases at S) + max(slack * max(phases at S), slack_floor) + overhead

is increasing in S and B, so the longest context (and the most rows) that fit a budget are found by bisection.

Measurement (``measure_prefill``): a fresh ``python`` imports torch and kimiq and warms up (builds a tiny model
on the meta device, which imports torch's lazy sympy machinery as loading does, and runs a tiny model's
prefill and decode); its VmRSS is the baseline and VmHWM is reset (``/proc/self/clear_refs``).  It then loads
the checkpoint, allocates ``new_state(B, capacity=S)`` and prefills S random tokens in chunks of C with the
state carried, holding each chunk's logits.  ``peak = VmHWM - baseline`` counts weights + state + buffers +
allocator slack, not the Python/torch baseline; compare it with ``MemoryPlan.model_bytes``.  Default model,
fp32: within -13% to +7% at 2k-16k context (tests/eval/test_plan.py; 2026-12-01, flash attention).
Not modelled: CPU bf16/fp16, where oneDNN keeps primitives and buffers per matmul shape (kv_b_proj over the
growing context is a new shape every chunk; RSS 27-49% above the plan at 2k-4k, measured with the math attention
path), and load-time allocator slack of small checkpoints (~8 MiB for 283 tensors).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kimiq.config import ModelConfig

__all__ = ["BUILTIN_CONFIGS", "DEVICES", "FLOAT_RECIPES", "Device", "Measurement", "MemoryPlan", "Planner", "Source",
           "Weights", "attention_workspace", "capacity_table", "chunk_phases", "dtype_bytes", "kda_state_bytes",
           "measure_prefill", "mla_bytes_per_token", "parse_size", "report", "resolve_source", "summary",
           "weight_footprint"]

MiB, GiB = 2**20, 2**30
FLOAT_RECIPES = {"f32": 4, "fp32": 4, "bf16": 2, "f16": 2, "fp16": 2}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2} | FLOAT_RECIPES


def dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(_DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Device:
    name: str
    overhead: int  # fixed bytes not proportional to the model (Python/torch runtime, CUDA context)
    attention: str  # SDPA's kernel: "flash" (v padded to the q/k dim), "efficient" (unequal dims) or "math"
    slack: float  # allocator memory beyond live tensors, as a fraction of the chunk workspace
    int4_kernel: bool  # 4-bit affine-form linears run torch's int4 kernel on a cached repack
    slack_floor: int = 0  # allocator slack of at least this many bytes


DEVICES = {"cpu": Device("cpu", 400 * MiB, "flash", 0.2, True, 16 * MiB),
           "cuda": Device("cuda", 1 * GiB, "efficient", 0.1, False)}


# ----------------------------------------------------------------------------------------------- persistent
@dataclass(frozen=True)
class Weights:
    label: str  # "bf16", "q4_k_m", a quantized checkpoint's recipe
    nbytes: int  # stored: packed formats + kept tensors
    n_params: int
    int4_repack: int = 0  # CPU: copies torch's int4 kernel makes of 4-bit affine-form linears (kept alongside)
    max_dequant_cpu: int = 0  # elements of the largest linear the CPU dequantizes per call (reference path)
    max_dequant: int = 0  # the same without the int4 kernel (CUDA: every quantized linear)
    kv_b_dequant: int = 0  # bytes: quantized kv_b_proj kept dequantized for MLA's absorbed decode (QuantLinear.weight)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.n_params


def weight_footprint(cfg: ModelConfig, recipe: str | None = None, *, dtype: str | None = None,
                     formats: dict[str, str] | None = None, label: str | None = None) -> Weights:
    """Runtime weight bytes.  ``recipe``: a built-in / JSON recipe, a float name (``bf16``, ``f16``, ``f32``) or
    None = the model dtype; ``formats``: an already-quantized checkpoint's ``quantization_config.formats``.
    Kept tensors are counted in ``dtype`` (default: the config's), ``keep_fp32`` ones in fp32."""
    from kimiq.model.model import keep_fp32
    from kimiq.quant.modules import int4_group, int4_repacked
    from kimiq.quant.recipes import KEEP, get_recipe, plan_bytes, tensor_specs

    dtype = str(dtype or cfg.dtype).removeprefix("torch.")
    e = dtype_bytes(dtype)
    if recipe is not None and formats is not None:
        raise ValueError("the checkpoint is already quantized; --recipe applies to full-precision checkpoints")
    if recipe is None or recipe in FLOAT_RECIPES:
        e = FLOAT_RECIPES.get(recipe, e) if recipe else e
        plan = {s.name: formats.get(s.name, KEEP) if formats else KEEP for s in tensor_specs(cfg)}
        label = label or (f"checkpoint ({len(formats)} quantized)" if formats else
                          recipe or {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, dtype))
    else:
        r = get_recipe(recipe)
        plan, label = r.plan(cfg), label or r.name
    nbytes, n = plan_bytes(cfg, plan, lambda s: 32 if keep_fp32(s.name) else 8 * e)
    repack = deq_cpu = deq = kv_b = 0
    for s in tensor_specs(cfg):  # quantized linears (embedding rows are dequantized per token: not counted)
        fmt = plan[s.name]
        if fmt == KEEP or s.role == "embed" or len(s.shape) != 2:
            continue
        N, K = s.shape
        deq = max(deq, N * K)
        if s.name.endswith("kv_b_proj.weight"):
            kv_b += N * K * e
        group = int4_group(fmt)
        if group and N % 64 == 0 and int4_repacked(fmt):  # modules._int4_pack: uint8 [N, K/2] + bf16 [K/g, N, 2]
            repack += N * K // 2 + (K // group) * N * 4
        else:
            deq_cpu = max(deq_cpu, N * K)
    return Weights(label, nbytes, n, repack, deq_cpu, deq, kv_b)


def kda_state_bytes(cfg: ModelConfig, conv_bytes: int) -> tuple[int, int]:
    """Per row, over all KDA layers: (recurrent fp32 [H, K, K], conv taps 3 x [P, W-1] at ``conv_bytes``)."""
    k = cfg.kda
    n = len(cfg.kda_layers)
    recurrent = n * k.num_heads * k.head_dim * k.head_dim * 4  # [H, K, V=K] fp32
    return recurrent, n * 3 * k.proj_dim * (k.short_conv_kernel_size - 1) * conv_bytes


def mla_bytes_per_token(cfg: ModelConfig, elem_bytes: int, *, separate_v: bool = False) -> int:
    """Latent cache per row and token over all MLA layers: (R + rope) values each; ``separate_v`` adds llama.cpp's
    separate V latent cache (R more, before ggml-org/llama.cpp#19067)."""
    m = cfg.mla
    per_layer = m.kv_lora_rank + m.qk_rope_head_dim + (m.kv_lora_rank if separate_v else 0)
    return len(cfg.mla_layers) * per_layer * elem_bytes


# ----------------------------------------------------------------------------------------------- transient
def attention_workspace(cfg: ModelConfig, batch: int, chunk: int, context: int, e: int, kind: str,
                        cache_e: int | None = None) -> int:
    """Peak bytes of one MLA layer's expanded prefill: C new queries over S cached positions (module docstring);
    a cache in another dtype (``cache_e`` bytes a value) is read back as a model-dtype copy of its S latents."""
    m = cfg.mla
    B, C, S, H = batch, chunk, context, m.num_heads
    dqk, dv = m.qk_head_dim, m.v_head_dim
    kv = B * S * H * (m.qk_nope_head_dim + dv) * e + B * S * H * dqk * e  # kv_b_proj(c) [B,S,H,nope+v], k [B,S,H,qk]
    if cache_e not in (None, e):
        kv += B * S * m.latent_dim * e
    q = B * C * H * dqk * e
    mask = B * C * S  # bool [B, C, S]
    if kind == "flash":  # float bias, v padded to the q/k head dim, the padded output; no [B, H, C, S]
        return kv + q + mask + B * C * S * e + B * H * S * dqk * e + B * H * C * dqk * e
    if kind == "efficient":
        return kv + q + mask + 2 * B * C * S * e  # float bias + one aligned copy; no [B, H, C, S]
    up = 0 if e == 4 else B * H * (C * dqk + S * (dqk + dv)) * 4  # math SDPA upcasts reduced q/k/v to fp32
    base = kv + q + up + B * C * H * dqk * 4 + mask + B * C * S * e  # + scaled q, float mask
    hc = B * H * C * S
    return base + max(hc * 4 + B * H * S * dqk * 4, hc * (4 + 4 + 1))  # q@k^T with scaled k | softmax + isneginf


def chunk_phases(cfg: ModelConfig, batch: int, chunk: int, context: int, e: int, attention: str,
                 last_only: bool = False, cache_e: int | None = None) -> dict[str, int]:
    """Transient bytes of each phase of a prefill chunk whose last position is ``context`` (residual included);
    ``last_only``: the head runs on each row's last position only (``model(..., last_only=True)``)."""
    N, D, V = batch * chunk, cfg.hidden_size, cfg.vocab_size
    resid = 3 * N * D * e
    rows = batch if last_only else N
    phases = {
        "mla attention": attention_workspace(cfg, batch, chunk, context, e, attention, cache_e)
        if cfg.mla_layers else 0,
        "kda chunk": N * cfg.kda.proj_dim * (3 * e + 40 + (4 if e < 4 else 0)) if cfg.kda_layers else 0,
        "lm_head": rows * V * e + (rows * V * 4 if e < 4 else 0),
    }
    if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        phases["dense mlp"] = 4 * N * cfg.intermediate_size * e + N * D * e
    if cfg.moe is not None and any(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        mo = cfg.moe
        I_sh = mo.moe_intermediate_size * mo.num_shared_experts
        phases["moe"] = (3 * N * mo.num_experts * 4 + N * mo.num_experts_per_token * (D * e + 24)
                         + N * D * e + 4 * N * I_sh * e + N * (3 * mo.moe_intermediate_size + D) * e)
    return {k: v + resid for k, v in phases.items()}


# ----------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of a chunked prefill of ``context`` tokens for ``batch`` rows (bytes)."""

    model: str
    weights: Weights
    device: str
    dtype: str
    batch: int
    context: int
    chunk: int
    int4_repack: int  # CPU int4-kernel copies of 4-bit linears, on top of weights.nbytes
    kda_state: int  # all rows
    mla_per_token: int  # one row, one token, cache dtype (the model dtype unless Planner.cache_dtype)
    mla_cache: int  # all rows x context
    logits: int  # previous chunk's fp32 logits, held by the caller
    workspace: int  # the largest phase of the last chunk
    workspace_phase: str
    slack: int  # allocator memory beyond live tensors (Device.slack x workspace, at least Device.slack_floor)
    overhead: int
    phases: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total(self) -> int:
        return self.model_bytes + self.overhead

    @property
    def model_bytes(self) -> int:
        """Everything but the fixed runtime overhead: what ``measure_prefill`` measures."""
        return (self.weights.nbytes + self.int4_repack + self.weights.kv_b_dequant + self.kda_state + self.mla_cache
                + self.logits + self.workspace + self.slack)

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def __str__(self) -> str:
        rows = [
            (f"weights ({self.weights.label}, {self.weights.bits_per_weight:.2f} bpw)", self.weights.nbytes),
            *([("int4 kernel repacks of 4-bit linears (CPU)", self.int4_repack)] if self.int4_repack else []),
            *([("kv_b_proj dequantized for MLA decode", self.weights.kv_b_dequant)]
              if self.weights.kv_b_dequant else []),
            (f"KDA state ({self.batch} x {self.kda_state // self.batch:,} B)", self.kda_state),
            (f"MLA latent cache ({self.batch} x {self.context:,} x {self.mla_per_token:,} B)", self.mla_cache),
            ("logits held (previous chunk, fp32)", self.logits),
            (f"workspace: {self.workspace_phase} (chunk {self.chunk})", self.workspace),
            ("allocator slack", self.slack),
            (f"runtime overhead ({self.device})", self.overhead),
        ]
        lines = [f"{name:<62} {_fmt(b):>11}" for name, b in rows]
        lines.append(f"{'total':<62} {_fmt(self.total):>11}")
        return "\n".join(lines)


def _fmt(b: float) -> str:
    for unit, s in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(b) >= s:
            return f"{b / s:.2f} {unit}"
    return f"{int(b)} B"


@dataclass(frozen=True)
class Planner:
    """One model, weight footprint, model dtype, device and prefill chunk; plans any batch x context."""

    cfg: ModelConfig
    weights: Weights
    dtype: str = "bfloat16"
    device: Device = DEVICES["cpu"]
    chunk: int = 512
    model: str = ""
    last_only: bool = False  # prefill keeps only each row's last logits (the engine's prefill), not [B, C, V]
    cache_dtype: str = ""  # MLA latent cache dtype (model.cache_dtype); "" = the model dtype

    def plan(self, context: int, batch: int = 1) -> MemoryPlan:
        e, ce = dtype_bytes(self.dtype), dtype_bytes(self.cache_dtype or self.dtype)
        rec, conv = kda_state_bytes(self.cfg, e)
        per_tok = mla_bytes_per_token(self.cfg, ce)
        C = min(self.chunk, context)
        before = (context - 1) // C  # full chunks before the last one
        last = context - before * C  # the last chunk, 1..C tokens, ends at S
        # the peak is the last chunk or, when that one is short, the full chunk before it
        cands = [(last, context)] + ([(C, context - last)] if before and last < C else [])
        attention = self.device.attention
        best = max((chunk_phases(self.cfg, batch, c, s, e, attention, self.last_only, ce) for c, s in cands),
                   key=lambda ph: max(ph.values()))
        w, int4 = self.weights, self.device.int4_kernel
        deq = w.max_dequant_cpu if int4 else w.max_dequant
        if deq:  # a quantized linear on the reference path dequantizes its whole weight per call
            best = best | {"dequantized weight": deq * e + 3 * batch * C * self.cfg.hidden_size * e}
        held = 0 if not before else batch * self.cfg.vocab_size * 4 * (1 if self.last_only else C)
        phase = max(best, key=best.get)
        return MemoryPlan(
            model=self.model, weights=self.weights, device=self.device.name, dtype=self.dtype, batch=batch,
            context=context, chunk=C, int4_repack=w.int4_repack if int4 else 0, kda_state=batch * (rec + conv),
            mla_per_token=per_tok,
            mla_cache=batch * context * per_tok, logits=held,
            workspace=best[phase], workspace_phase=phase,
            slack=max(int(self.device.slack * best[phase]), self.device.slack_floor),
            overhead=self.device.overhead, phases=best,
        )

    def max_context(self, budget: int, batch: int = 1, limit: int = 1 << 24) -> int:
        """Longest context (<= ``limit``) whose prefill peak fits ``budget``; 0 if not even one token does."""
        return _bisect(lambda s: self.plan(s, batch).fits(budget), limit)

    def max_batch(self, budget: int, context: int, limit: int = 1 << 16) -> int:
        """Most rows at ``context`` tokens each that fit ``budget``; 0 if one does not."""
        return _bisect(lambda b: self.plan(context, b).fits(budget), limit)


def _bisect(ok, limit: int) -> int:
    """Largest n in [1, limit] with ok(n) for a monotone ok, else 0."""
    if not ok(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


# ----------------------------------------------------------------------------------------------- table / parsing
def parse_size(text: str, default_unit: str = "GiB") -> int:
    """"24GB" (10^9), "24GiB" / "24G" (2^30), "512MiB", "512MB"; a bare number is in ``default_unit``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot read memory size {text!r} (e.g. 24GB, 24GiB, 512MiB)")
    num, prefix, i, b = m.groups()
    if not prefix:
        if b:
            return int(float(num))
        return parse_size(num + default_unit)
    power = "kmgt".index(prefix.lower()) + 1
    base = 1000 if (b and not i) else 1024  # "GB" decimal; "GiB" and bare "G" binary
    return int(float(num) * base**power)


def _tokens(n: int) -> str:
    if n == 0:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f}M"
    return f"{n / 1024:.0f}k" if n >= 10240 else (f"{n / 1024:.1f}k" if n >= 1024 else str(n))


def capacity_table(planners: list[Planner], budgets: list[int], *, batch: int = 1, context: int | None = None) -> str:
    """Rows: weight formats; columns: budgets.  Cells: the longest context for ``batch`` rows, or with
    ``context`` the most rows of that length; '*' past the config's model_max_length, '-' when nothing fits."""
    what = f"rows of {context:,} tokens" if context else f"max context, batch {batch}"
    head = f"{'weights':<14}{'size':>10}  " + "".join(f"{b / GiB:>8.0f}G" for b in budgets)
    lines = [f"{what}; budgets in GiB (device {planners[0].device.name}, prefill chunk {planners[0].chunk})", head]
    for p in planners:
        cells = []
        for b in budgets:
            if context:
                cells.append(str(p.max_batch(b, context) or "-"))
            else:
                n = p.max_context(b, batch)
                cells.append(_tokens(n) + ("*" if n > p.cfg.model_max_length else ""))
        size = f"{p.weights.nbytes / 1e9:.2f}GB" if p.weights.nbytes >= 1e9 else f"{p.weights.nbytes / 1e6:.1f}MB"
        lines.append(f"{p.weights.label:<14}{size:>10}  " + "".join(f"{c:>9}" for c in cells))
    if not context:
        lines.append(f"* beyond model_max_length ({p.cfg.model_max_length:,})")
    return "\n".join(lines)


BUILTIN_CONFIGS = ("kimi-linear-48b", "48b")


@dataclass(frozen=True)
class Source:
    """What is planned: a config plus, for a checkpoint directory, its path and quantized formats."""

    cfg: ModelConfig
    label: str
    path: Path | None = None
    formats: dict[str, str] | None = field(default=None, compare=False)  # quantization_config.formats
    recipe: str | None = None  # quantization_config.recipe


def resolve_source(model: str | Path | None, config: str | None = None) -> Source:
    """A checkpoint directory (default: the embedded model), or a built-in config by name (no files needed)."""
    from kimiq import default_model_path
    from kimiq.config import KIMI_LINEAR_48B_HF
    from kimiq.model.weights import quantization_config

    name = config or (str(model) if model and str(model).lower() in BUILTIN_CONFIGS and not Path(model).exists()
                      else None)
    if name is not None:
        if name.lower() not in BUILTIN_CONFIGS:
            raise ValueError(f"unknown built-in config {name!r}; known: {', '.join(BUILTIN_CONFIGS)}")
        return Source(ModelConfig.from_hf(KIMI_LINEAR_48B_HF), "Kimi-Linear-48B-A3B (built-in config)")
    path = Path(model) if model else default_model_path()
    qc = quantization_config(path) if (path / "config.json").exists() else None
    label = "embedded default model" if not model else str(path)
    return Source(ModelConfig.from_file(path), label, path, (qc or {}).get("formats"), (qc or {}).get("recipe"))


def summary(p: Planner) -> str:
    """The per-model figures: weights, KDA state per row, MLA cache per token (engine dtype, bf16, llama.cpp)."""
    cfg, e = p.cfg, dtype_bytes(p.dtype)
    rec, conv = kda_state_bytes(cfg, e)
    _, conv32 = kda_state_bytes(cfg, 4)
    cache = p.cache_dtype or p.dtype
    tok, tok16 = mla_bytes_per_token(cfg, dtype_bytes(cache)), mla_bytes_per_token(cfg, 2)
    kv16 = mla_bytes_per_token(cfg, 2, separate_v=True)
    return "\n".join([
        (f"model: {p.model} — {cfg.num_hidden_layers} layers ({len(cfg.kda_layers)} KDA + {len(cfg.mla_layers)} "
         f"MLA), {p.weights.n_params / 1e9:.3f} B params; model dtype {p.dtype}; device {p.device.name}; "
         f"prefill chunk {p.chunk}"),
        (f"weights: {p.weights.label}: {p.weights.nbytes / 1e9:.2f} GB ({_fmt(p.weights.nbytes)}, "
         f"{p.weights.bits_per_weight:.2f} bpw)"),
        (f"KDA state per sequence: {_fmt(rec + conv)} = recurrent fp32 {_fmt(rec)} + conv taps {_fmt(conv)} "
         f"({p.dtype}); with fp32 taps (llama.cpp): {_fmt(rec + conv32)}"),
        (f"MLA latent cache per token: {tok:,} B ({cache}, as kimiq allocates it); {tok16:,} B at bf16/fp16 "
         f"({tok16 * 2**20 / GiB:.3f} GiB per 2^20 tokens); llama.cpp separate K+V latents: {kv16:,} B"),
        *([("note: CPU prefill in bf16/fp16 also keeps oneDNN primitives and buffers per matmul shape (a new "
            "shape per chunk): not modelled, RSS measured 27-49% above this plan on the default model")]
          if p.device.name == "cpu" and e < 4 else []),
    ])


def report(p: Planner, *, budget: int | None = None, batch: int = 1, context: int | None = None) -> str:
    """The ``kimiq plan`` text for one planner: summary, then the breakdown at ``context`` and/or the longest
    context (and most rows) that fit ``budget``."""
    out = [summary(p)]
    if budget is not None:
        n = p.max_context(budget, batch)
        out.append(f"\nbudget {_fmt(budget)} ({budget / 1e9:.2f} GB), batch {batch}: longest context "
                   f"{n:,} tokens" + (f" (beyond model_max_length {p.cfg.model_max_length:,})"
                                      if n > p.cfg.model_max_length else ""))
        if n:
            out.append(str(p.plan(n, batch)))
        else:
            need = p.plan(1, batch)
            out.append(f"does not fit: {batch} row(s) of one token already need {_fmt(need.total)}\n{need}")
        if context:
            out.append(f"rows of {context:,} tokens that fit: {p.max_batch(budget, context)}")
    if context:
        out.append(f"\nat {context:,} tokens x {batch} rows:\n{p.plan(context, batch)}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class Measurement:
    """Peak RSS of a real chunked prefill, relative to a warmed-up Python + torch + kimiq process (bytes)."""

    context: int
    chunk: int
    batch: int
    dtype: str
    baseline: int  # RSS after imports and warm-up: the runtime overhead, not counted below
    weights: int  # RSS growth from loading the checkpoint
    state: int  # ModelState.nbytes
    peak: int  # peak RSS growth over the baseline: weights + state + buffers + allocator slack
    seconds: float
    method: str  # "VmHWM" (reset after warm-up) or "ru_maxrss"


def measure_prefill(model_dir: str | Path | None, context: int, chunk: int = 512, batch: int = 1,
                    dtype: str = "float32", last_only: bool = False, timeout: float = 900,
                    cache_dtype: str = "") -> Measurement:
    """Run a chunked prefill of ``context`` random tokens in a fresh subprocess (CPU) and measure its peak RSS."""
    code = "import json, sys; from kimiq.eval.plan import _measure_child as m; print(json.dumps(m(*sys.argv[1:])))"
    args = [str(model_dir or ""), str(context), str(chunk), str(batch), dtype, str(int(last_only)), cache_dtype]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-2000:]}")
    return Measurement(**json.loads(out.stdout.strip().splitlines()[-1]))


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes from /proc, or (0, ru_maxrss) where /proc is absent."""
    try:
        s = Path("/proc/self/status").read_text()
        return tuple(int(re.search(k + r":\s+(\d+)", s)[1]) * 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore
    except (OSError, TypeError):
        import resource

        return 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_child(model_dir: str, context: str, chunk: str, batch: str, dtype: str, last_only: str,
                   cache_dtype: str = "") -> dict:
    import gc
    import time

    import torch

    from kimiq import load
    from kimiq.model.model import KimiLinearForCausalLM

    T, C, B = int(context), int(chunk), int(batch)
    with torch.device("meta"):  # loading builds on meta, which lazily imports torch's sympy machinery
        KimiLinearForCausalLM(ModelConfig.tiny())
    tiny = KimiLinearForCausalLM(ModelConfig.tiny()).init_weights()
    with torch.inference_mode():
        st = tiny.new_state(1, 32)
        tiny(torch.randint(0, 1000, (1, 32)), st)
        tiny(torch.randint(0, 1000, (1, 1)), st)
    del tiny, st
    gc.collect()
    method = "VmHWM"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        method = "ru_maxrss"
    base = _rss()[0] or _rss()[1]
    t0 = time.perf_counter()
    model, _ = load(model_dir or None, dtype=getattr(torch, dtype))
    model.cache_dtype = getattr(torch, cache_dtype) if cache_dtype else None
    after_load = _rss()[0]
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = model.new_state(B, capacity=T)
        logits = None
        for a in range(0, T, C):
            logits = model(ids[:, a : a + C], state, last_only=last_only == "1")  # [B, C|1, V]; held meanwhile
    assert logits is not None
    peak = _rss()[1]
    return {"context": T, "chunk": C, "batch": B, "dtype": dtype, "baseline": base,
            "weights": max(after_load - base, 0), "state": state.nbytes, "peak": peak - base,
            "seconds": time.perf_counter() - t0, "method": method}
