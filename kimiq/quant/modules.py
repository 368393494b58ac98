"""Quantized modules swapped into a model without touching model code, and the ``quantize`` verb.

* ``QuantLinear`` replaces ``nn.Linear`` (``weight`` stays readable: the dequantized matrix, for code
  such as MLA's absorbed decode that reads ``kv_b_proj.weight``);
* ``QuantEmbedding`` replaces ``nn.Embedding`` (gathers packed rows, dequantizes only those);
* ``QuantExperts`` replaces the stacked ``Experts`` (one format per projection, parts stacked over
  experts), with the same grouped dispatch.

Packed parts are buffers named ``<prefix>_<suffix>`` (``q_weight``, ``q_scales``; ``w1_weight`` ... for
experts) so ``state_dict`` round-trips.  Forward passes are the *reference* path (dequantize, then
matmul in the input dtype) except on CPU, where ``_cpu_path`` picks by format and row count among kimiq's fused
dequantize-matmul kernels reading the stored blocks (decode), torch's packed int4 kernel (4-bit affine-form
formats without an int8-activation kernel) and C dequantization + dense GEMM (prefill).  ``quantize(model, recipe)``
quantizes an in-memory model with exactly the bytes ``kimiq quantize`` writes; tensors inside other
modules (the router gate) are replaced by their dequantized values, which is what a quantized router
computes.  ``checkpoint_tensor(model, name)`` reads any checkpoint tensor back as float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimiq.model.moe import Experts, dispatch
from kimiq.ops import qmatmul, qops

from . import opaque
from .formats import Format, get_format
from .recipes import KEEP, Recipe, get_recipe

__all__ = ["QuantLinear", "QuantEmbedding", "QuantExperts", "quantize", "quantized_modules", "checkpoint_tensor",
           "Parts"]

Parts = dict[str, torch.Tensor]


class _Packed(nn.Module):
    """Holds one format's parts as buffers ``<prefix>_<suffix>``."""

    def _set_parts(self, prefix: str, parts: Parts) -> None:
        for k, v in parts.items():
            self.register_buffer(f"{prefix}_{k}", v)

    def _parts(self, prefix: str) -> Parts:
        n = len(prefix) + 1
        return {name[n:]: b for name, b in self.named_buffers(recurse=False) if name.startswith(prefix + "_")}


class QuantLinear(_Packed):
    """``use_fast``: on CPU, the kernel ``_cpu_path`` picks: kimiq's fused kernels on the stored blocks
    (``kimiq.ops.qmatmul``) for few rows, torch's packed int4 kernel (``_weight_int4pack_mm_for_cpu``, on a repack
    made at first use) for 4-bit affine-form formats without an int8-activation kernel (q4_0, affine4-g*; q4_k
    on builds without VNNI), C dequantization + dense GEMM for prefill; elsewhere, and with ``use_fast = False``,
    the reference dequantize-then-matmul."""

    def __init__(self, fmt: str | Format, in_features: int, out_features: int, parts: Parts,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self._set_parts("q", parts)
        self.register_buffer("_dequantized", None, persistent=False)  # see dequantized_weight
        opaque.register(self)
        self.use_fast = True
        self._int4: tuple | None | bool = None  # (packed, group, scales_and_zeros); False: not possible
        self._fused: dict | None | bool = None  # qmatmul.prepare's tensors; False: no kernel for the format

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the compute dtype (dequantized on the first read, then kept)."""
        if torch.compiler.is_compiling() and self._dequantized is None:
            return opaque.quant_weight(self.opaque_handle)
        return self.dequantized_weight()  # compiling: the kept buffer, read by the graph like any buffer

    def dequantized_weight(self) -> torch.Tensor:
        """Dequantized on first use, then kept: only code that reads ``weight`` pays that memory (MLA's absorbed
        decode reads ``kv_b_proj.weight`` every step; dequantizing a Q4_K [8192, 512] each time took 22 ms)."""
        if self._dequantized is None:
            self._dequantized = self.fmt.dequantize(self._parts("q"), (self.out_features, self.in_features),
                                                    self.compute_dtype)
        return self._dequantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self.use_fast and isinstance(self._int4, tuple) and _int4_ok(x):  # torch's int4 op traces as is
                return _int4_mm(x.reshape(-1, self.in_features), self._int4).view(*x.shape[:-1], self.out_features)
            fid = qops.FORMAT_ID.get(self.fmt.name)
            if self.use_fast and fid is not None and _int4_ok(x) and qops.loaded():  # a C++ op: no Python
                return torch.ops.kimiq_cpu.qlinear(x, self.q_weight, fid, self.out_features)
            return opaque.quant_linear(x, self.opaque_handle)  # one opaque node (kimiq.quant.opaque)
        return self.eager_forward(x)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fast and _int4_ok(x):
            path = _cpu_path(x.numel() // self.in_features, self.fmt.name, x.dtype)
            if path == "dense":  # prefill: C dequantization, dense GEMM
                w = self._fast_dequantized(x.dtype)
                if w is not None:
                    return F.linear(x, w)
            if path == "int4":
                if self._int4 is None:
                    self._int4 = _int4_pack(self.fmt.name, self._parts("q"), self.in_features) or False
                if self._int4:
                    y = _int4_mm(x.reshape(-1, self.in_features), self._int4)
                    return y.view(*x.shape[:-1], self.out_features)
            fid = qops.FORMAT_ID.get(self.fmt.name)
            if path == "fused" and fid is not None and qops.loaded():  # the same kernels, ~3 µs less a call
                return torch.ops.kimiq_cpu.qlinear(x, self.q_weight, fid, self.out_features)
            if self._fused is None:
                self._fused = qmatmul.prepare(self.fmt.name, self._parts("q")) or False
            if self._fused:
                y = qmatmul.qmatmul(self.fmt.name, self._fused, x.reshape(-1, self.in_features), self.out_features,
                                    rows_unlimited=path == "fused")
                if y is not None:
                    return y.view(*x.shape[:-1], self.out_features)
        w = self.fmt.dequantize(self._parts("q"), (self.out_features, self.in_features), x.dtype)
        return F.linear(x, w)

    def _fast_dequantized(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self._fused is None:
            self._fused = qmatmul.prepare(self.fmt.name, self._parts("q")) or False
        if not self._fused:
            return None
        return qmatmul.dequantize(self.fmt.name, self._fused, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.fmt.name}"


def _cpu_path(rows: int, fmt: str, dtype: torch.dtype) -> str:
    """The CPU kernel for ``rows`` activation rows times a ``fmt`` weight, as measured on a 2-core AVX-512 EPYC
    (2304x1024 and 256x256 weights, 1 and 2 threads):

    * "fused": kimiq's dequantize-matmul kernels on the stored blocks (``qmatmul``), up to MAX_ROWS rows; with no
      row limit for formats whose kernel quantizes activations to int8 per 256 (Q4_K / Q6_K on VNNI builds) in
      fp32 where torch's fp32 GEMM is slow (MKL on an AMD CPU, ``_fp32_gemm_fast``: ~3x slower than the int8
      kernel even at 128 rows on the EPYC; on a 2-core Ice Lake Xeon the other way round, 256x256 Q4_K at 512 rows:
      fused 1.2-1.6 ms, dense 0.56-0.62 ms, crossover 8-16 rows).  Q4_K there beats torch's int4 kernel at every
      row count (1 row, 2304x1024: 34 vs 64 µs, 4 rows: 81 vs 115) and needs no repack.
    * "int4": torch's int4 kernel on a repack made at first use (4-bit affine-form formats otherwise), below
      GEMM_ROWS rows;
    * "dense": C dequantization, then a dense GEMM (prefill): above MAX_ROWS (from GEMM_ROWS for "int4")."""
    k8 = qmatmul.int8_activations(fmt) == 256
    if int4_group(fmt) and not k8:
        return "int4" if rows < qmatmul.GEMM_ROWS else "dense"
    if rows <= qmatmul.MAX_ROWS or (k8 and dtype == torch.float32 and not _fp32_gemm_fast()):
        return "fused"
    return "dense"


@functools.cache
def _fp32_gemm_fast() -> bool:
    """Whether torch's fp32 GEMM runs MKL's fast code paths here: an MKL build on an Intel CPU (read once, at first
    use, from /proc/cpuinfo; elsewhere assumed slow, which keeps the int8 kernels)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def int4_repacked(fmt: str) -> bool:
    """Whether CPU decode of a ``fmt`` linear runs torch's int4 kernel, on a repack kept beside the stored weight
    (for ``kimiq plan``): 4-bit affine-form formats without an int8-activation kernel on this machine."""
    return _cpu_path(1, fmt, torch.bfloat16) == "int4"


def int4_group(fmt: str) -> int:
    """The group size of a 4-bit affine-form format (the ones ``_int4_pack`` can repack for torch's int4 kernel:
    q4_0 / q4_k 32, affine4-g<g> g), else 0."""
    from .dequant import INT4_AFFINE

    if fmt in INT4_AFFINE:
        return 32
    return int(fmt.split("-g")[1]) if fmt.startswith("affine4-g") else 0


def _int4_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _int4_mm(x2: torch.Tensor, pack: tuple) -> torch.Tensor:
    """[M, K] @ packed int4 weight^T -> [M, N] in x2's dtype.  bf16 activations even for an fp32 model: torch's
    fp32 int4 kernel is ~20x slower on CPU, and rounding x to bf16 (~3e-3 relative) is far below 4-bit error."""
    packed, group, sz = pack
    return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, group, sz).to(x2.dtype)


def _int4_pack(fmt: str, parts: Parts, K: int):
    """(int4pack weight, group, bf16 scales_and_zeros [K/g, N, 2]) for torch's CPU int4 kernel, or None
    (the kernel wants N a multiple of 64)."""
    from .affine import unpack_bits
    from .dequant import INT4_AFFINE, gguf_int4_affine

    group = int4_group(fmt)
    if fmt in INT4_AFFINE:
        q, scale, zero = gguf_int4_affine(fmt, parts["weight"], K)
    elif group:
        q = unpack_bits(parts["weight"], 4, K).to(torch.int32)
        scale = parts["scales"].float()
        zero = parts["biases"].float() + 8 * scale  # s*q + b = (q - 8)*s + (b + 8s)
    else:
        return None
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    except RuntimeError:  # shapes the kernel does not take: stay on the reference path
        return None
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
    return packed, group, sz


class QuantEmbedding(_Packed):
    def __init__(self, fmt: str | Format, num_embeddings: int, embedding_dim: int, parts: Parts,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype = dtype
        self._set_parts("q", parts)
        opaque.register(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            fid = qops.FORMAT_ID.get(self.fmt.name)
            if fid is not None and self.compute_dtype in (torch.float32, torch.bfloat16) and qops.loaded():
                return torch.ops.kimiq_cpu.qrows(self.q_weight, ids, fid, self.embedding_dim,
                                                 self.compute_dtype == torch.bfloat16)
            return opaque.quant_embedding(ids, self.opaque_handle)
        return self.eager_forward(ids)

    def eager_forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {k: v.index_select(0, flat) for k, v in self._parts("q").items()}  # every format packs row-wise
        out = self.fmt.dequantize(rows, (flat.numel(), self.embedding_dim), self.compute_dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"


class QuantExperts(_Packed):
    """Stacked routed experts with packed ``w1`` (gate) / ``w3`` (up) / ``w2`` (down); parts stacked [E, ...]."""

    def __init__(self, fmts: dict[str, str], shapes: dict[str, tuple[int, int]], parts: dict[str, Parts],
                 num_experts: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmts = {k: get_format(v) for k, v in fmts.items()}
        self.shapes = shapes
        self.num_experts = num_experts
        self.compute_dtype = dtype
        for k in ("w1", "w3", "w2"):
            self._set_parts(k, parts[k])
        opaque.register(self)
        self.use_fast = True
        self._int4: dict[tuple[str, int], tuple | bool] = {}  # (proj, expert) -> int4 kernel pack or False
        self._fused: dict[str, dict | bool] = {}  # proj -> qmatmul.prepare's stacked tensors or False

    def expert_weight(self, proj: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        parts = {k: v[e] for k, v in self._parts(proj).items()}
        return self.fmts[proj].dequantize(parts, self.shapes[proj], dtype)

    def _matmul(self, x: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        """x @ W_e^T for one expert: the CPU kernels as in QuantLinear (int4, else fused on the stacked
        blocks, no copy per expert), else the reference dequantize-then-matmul."""
        if self.use_fast and _int4_ok(x):
            if proj not in self._fused:
                self._fused[proj] = qmatmul.prepare(self.fmts[proj].name, self._parts(proj)) or False
            path = _cpu_path(x.shape[0], self.fmts[proj].name, x.dtype)
            if path == "dense" and self._fused[proj]:  # prefill: C dequant, GEMM
                w = qmatmul.dequantize(self.fmts[proj].name, self._fused[proj], self.shapes[proj], x.dtype, index=e)
                if w is not None:
                    return x @ w.t()
            key = (proj, e)
            if path == "int4" and key not in self._int4:
                parts = {k: v[e] for k, v in self._parts(proj).items()}
                self._int4[key] = _int4_pack(self.fmts[proj].name, parts, self.shapes[proj][1]) or False
            if path == "int4" and self._int4[key]:
                return _int4_mm(x, self._int4[key])
            if self._fused[proj]:
                y = qmatmul.qmatmul(self.fmts[proj].name, self._fused[proj], x, self.shapes[proj][0], index=e,
                                    rows_unlimited=path == "fused")
                if y is not None:
                    return y
        return x @ self.expert_weight(proj, e, x.dtype).t()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """As ``Experts.forward`` (the same ``dispatch``), with packed expert weights.  One token (decode) or a
        compiled graph: the whole layer in one call of kimiq's C++ operator where it is loaded."""
        compiling = torch.compiler.is_compiling()
        if compiling or x.shape[0] == 1:
            fids = [qops.FORMAT_ID.get(self.fmts[k].name) for k in ("w1", "w3", "w2")]
            if self.use_fast and None not in fids and _int4_ok(x) and qops.loaded() and not self._int4_wins():
                return torch.ops.kimiq_cpu.qexperts(x, weights.float(), idx, self.w1_weight, self.w3_weight,
                                                    self.w2_weight, *fids)
        if compiling:
            return opaque.quant_experts(x, weights, idx, self.opaque_handle)
        return self.eager_forward(x, weights, idx)

    INT4_MIN_WEIGHTS = 1 << 20

    def _int4_wins(self) -> bool:
        """Large experts whose decode runs torch's int4 kernel (``_cpu_path``: 4-bit affine-form formats without an
        int8-activation kernel) run faster through it, one Python-level call per expert (48B width, 2304x1024 Q4_0:
        64 µs vs 96 µs in kimiq's C kernel), than through the one C++ call per layer; small ones the other way round
        (default model, 256x256: the ~15 µs of a Python call exceed either kernel)."""
        n, k = self.shapes["w1"]
        return n * k >= self.INT4_MIN_WEIGHTS and all(int4_repacked(f.name) for f in self.fmts.values())

    def eager_forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
            h = F.silu(self._matmul(xe, "w1", e)) * self._matmul(xe, "w3", e)
            return self._matmul(h, "w2", e)

        return dispatch(x, weights, idx, self.num_experts, expert)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + ", ".join(f"{k}={f.name}" for k, f in self.fmts.items())


def checkpoint_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The value of checkpoint tensor ``name`` (HF name) in float32, dequantized where ``model`` holds it packed."""
    from kimiq.model.weights import _internal

    if ".experts." in name:
        base, e, proj, _ = name.rsplit(".", 3)
        experts = model.get_submodule(base)
        if isinstance(experts, QuantExperts):
            return experts.expert_weight(proj, int(e), torch.float32)
    mod_path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_path) if ".experts." not in name else None
    if isinstance(mod, QuantLinear):
        return mod.fmt.dequantize(mod._parts("q"), (mod.out_features, mod.in_features))
    if isinstance(mod, QuantEmbedding):
        return mod.fmt.dequantize(mod._parts("q"), (mod.num_embeddings, mod.embedding_dim))
    iname, row = _internal(name)
    holder, _, attr = iname.rpartition(".")
    t = getattr(model.get_submodule(holder), attr)  # parameter or buffer
    return (t[row] if row is not None else t).detach().to(torch.float32)


def _stack(parts_list: list[Parts]) -> Parts:
    return {k: torch.stack([p[k] for p in parts_list]) for k in parts_list[0]}


def quantized_modules(model: nn.Module, plan: dict[str, str], get_parts, dtype: torch.dtype) -> None:
    """Swap modules of ``model`` for quantized ones following ``plan`` (checkpoint name -> format).

    ``get_parts(name, fmt) -> Parts`` supplies the packed tensors of a checkpoint tensor (quantizing
    in memory, or reading from disk).  Tensors of modules without a quantized twin get the
    dequantized value of their parts (same result as running them quantized).
    """
    experts: dict[str, dict] = {}
    for name, fmt in plan.items():
        if fmt == KEEP:
            continue
        mod_path, _, leaf = name.rpartition(".")
        if ".experts." in name:  # model.layers.L.block_sparse_moe.experts.E.w1.weight
            base, e, proj = name.rsplit(".", 3)[0], int(name.rsplit(".", 3)[1]), name.rsplit(".", 3)[2]
            experts.setdefault(base, {}).setdefault(proj, {})[e] = (fmt, name)
            continue
        mod = model.get_submodule(mod_path)
        if isinstance(mod, nn.Linear) and leaf == "weight" and mod.bias is None:
            q = QuantLinear(fmt, mod.in_features, mod.out_features, get_parts(name, fmt), dtype)
        elif isinstance(mod, nn.Embedding) and leaf == "weight":
            q = QuantEmbedding(fmt, mod.num_embeddings, mod.embedding_dim, get_parts(name, fmt), dtype)
        else:  # e.g. the router gate: keep a float tensor equal to the dequantized weight
            old = getattr(mod, leaf)
            w = get_format(fmt).dequantize(get_parts(name, fmt), tuple(old.shape), torch.float32)
            setattr(mod, leaf, nn.Parameter(w.to(old.dtype if not old.is_meta else torch.float32), False))
            continue
        parent, _, child = mod_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    for base, projs in experts.items():
        mod = model.get_submodule(base)
        assert isinstance(mod, Experts), base
        E = mod.w1.shape[0]
        fmts, shapes, parts = {}, {}, {}
        for proj in ("w1", "w3", "w2"):
            shape = tuple(getattr(mod, proj).shape[1:])
            got = projs.get(proj, {})
            kinds = {f for f, _ in got.values()}
            if len(got) != E or len(kinds) != 1:
                raise ValueError(f"{base}.*.{proj}: all {E} experts of a projection need one format, got "
                                 f"{len(got)} quantized with {sorted(kinds)}")
            fmts[proj] = kinds.pop()
            shapes[proj] = shape
            parts[proj] = _stack([get_parts(got[e][1], fmts[proj]) for e in range(E)])
        missing = [p for p in ("w1", "w3", "w2") if p not in projs]
        if missing:
            raise ValueError(f"{base}: projections {missing} not quantized; quantize all three or none")
        parent, _, child = base.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantExperts(fmts, shapes, parts, E, dtype))


def quantize(model: nn.Module, recipe: str | Recipe, imatrix: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Quantize an in-memory Kimi-Linear model in place with ``recipe``; returns it.

    Weights are quantized from their current values (the checkpoint's bf16 values for a loaded
    model), so the bytes equal what ``kimiq quantize`` writes for the same checkpoint.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    cfg = model.config
    plan = recipe.plan(cfg)
    sd = {}
    for n, t in model.state_dict().items():
        m = n.rsplit(".", 1)
        if m[0].endswith(".experts") and m[1] in ("w1", "w2", "w3"):
            sd.update({f"{m[0]}.{e}.{m[1]}.weight": t[e] for e in range(t.shape[0])})
        else:
            sd[n] = t

    def get_parts(name: str, fmt: str) -> Parts:
        qw = imatrix.get(name) if imatrix else None
        return get_format(fmt).quantize(sd[name].detach().cpu(), qw)

    quantized_modules(model, plan, get_parts, model.dtype)
    model.quantization_plan = {"recipe": recipe.name, "formats": {k: v for k, v in plan.items() if v != KEEP}}
    return model
