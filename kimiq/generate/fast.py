"""The compiled decode step: one token per row through the whole model as one ``torch.compile`` graph.

    step = DecodeStep(model)                  # compile=False: the same function run eagerly
    logits = step(ids, state)                 # == model(ids, state, last_only=True) for ids [B, 1]

Eager decode of a small model is bound by per-op overhead (~60 kernels per KDA layer, each a few µs of
Python and dispatch around microseconds of math), so the whole step is one pure function that inductor
fuses: ``decode_step`` takes the KDA states (updated in place: conv taps and fp32 recurrent state) and a
read-only view of each MLA latent cache ``[B, L, R + rope]`` (L an unbacked dynamic size, so one graph serves
every context length), and returns the logits and the new latent entries, which ``DecodeStep`` then writes at
``state.lengths``.  MLA runs ``KimiMLAAttention.decode`` (absorbed, the cache only read); routed experts run
``Experts.gathered`` (no host sync: inductor fuses the expert gather into the reductions, reading only the
chosen experts).  Anything else (prefill, rows that sit out a step, a state with fewer than 2 cached tokens,
where sizes 0 and 1 would specialise the graph) goes to ``model(...)`` unchanged.

Quantized modules (``kimiq.quant``) enter the graph as torch's int4 op (4-bit affine-form formats), as kimiq's
C++ operators (``kimiq.ops.qops``: GGUF formats, a whole MoE layer's chosen experts in one call), or else as
opaque Python custom ops (``kimiq.quant.opaque``), one node per call, so their layers are compiled around them.
The first call compiles (10-30 s on 2 cores; ``mode="max-autotune"``: 25-75 s, and a C++ wrapper so no Python
runs between kernels).  ``tests/generate/test_fast.py`` checks it against ``model(...)``.
"""

from __future__ import annotations

import time
import types

import torch

from kimiq.config import LAYER_KDA
from kimiq.model.state import KDAState, MLAState
from kimiq.ops import qmatmul, qops
from kimiq.quant import opaque

__all__ = ["DecodeStep", "decode_step"]


def decode_step(model, ids: torch.Tensor, kda: list[KDAState], past: list[torch.Tensor], lengths: torch.Tensor):
    """ids [B, 1]; ``kda``: the KDA layers' states in layer order (updated in place); ``past``: per MLA layer
    its cache ``[B, L, R + rope]``, or ``[L, R + rope]`` for one row (slot j of row b valid for j < lengths[b]).
    Returns (logits [B, V] fp32, per MLA layer the new entries [B, 1, R + rope])."""
    x = model.model.embed_tokens(ids)  # [B, 1, D]
    news = []
    ki = mi = 0
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        if layer.layer_type == LAYER_KDA:
            a = layer.self_attn(h, kda[ki])
            ki += 1
        else:
            p = past[mi]
            a, new = layer.self_attn.decode(h, p if p.dim() == 3 else p.unsqueeze(0), lengths)
            news.append(new)
            mi += 1
        x = x + a
        h = layer.post_attention_layernorm(x)
        x = x + (layer.block_sparse_moe(h, gathered=True) if hasattr(layer, "block_sparse_moe") else layer.mlp(h))
    return model.lm_head(model.model.norm(x[:, 0])).float(), news


class DecodeStep:
    """``model(ids, state, n_valid=..., last_only=True)`` with single-token steps through ``decode_step``
    (compiled by default); other calls go to the model."""

    FREEZE_MAX_BYTES = 1 << 30  # float weights up to this size are frozen by default (see __init__)

    MODES = ("default", "max-autotune")

    def __init__(self, model, *, compile: bool = True, freeze: bool | None = None, mode: str = "default"):
        """``mode="max-autotune"``: inductor benchmarks its C++ GEMM templates against oneDNN for every frozen
        linear and emits a C++ wrapper (no Python between kernels): fp32 default model 2.1 -> 1.3 ms a step, bf16
        -> 1.3 ms, at the price of a compile of 25-75 s on 2 cores that inductor's disk cache does not shorten
        (frozen graphs hold oneDNN tensors it cannot pickle)."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.model = model
        self.compiled = compile
        self.mode = mode
        # inductor "freezing": parameters become constants, so linears run oneDNN on prepacked weights (fp32
        # default model: 2.8 -> 2.4 ms a step, A/B), at the price of a prepacked copy of the float weights; default:
        # only while those are at most FREEZE_MAX_BYTES
        float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
        self.frozen = compile and (float_bytes <= self.FREEZE_MAX_BYTES if freeze is None else freeze)
        quantized = opaque.register_all(model)  # quantized modules: handles for their custom ops
        if compile and model.device.type == "cpu":  # kimiq's C++ operators (KDA step, quantized kernels) and the
            qops.available()  # kernel library (kernel choices read it) built now, not while dynamo traces
            if quantized:
                qmatmul.available()
        for layer in model.model.layers:  # MLA decode reads kv_b_proj.weight: read once now, so that a quantized
            if layer.layer_type != LAYER_KDA:  # kv_b keeps its dequantized copy and the graph reads it as a buffer
                layer.self_attn.kv_b_proj.weight  # noqa: B018 (instead of an opaque op copying it every step)
        # No guards on the model's modules and parameters (checking them cost ~1.2 ms a step, a third of it): the
        # graphs are this model's, so change the model (quantize, swap modules) before building the step.  Dynamo
        # keeps graphs per code object, and unguarded, one model's graph would match another's: each step gets its
        # own copy of ``decode_step``'s code, hence its own graphs.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if mode == "max-autotune":
            options |= {"max_autotune": True, "cpp_wrapper": True,  # and no autotuning tables on stderr:
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        own = types.FunctionType(decode_step.__code__.replace(co_name=f"decode_step_{id(self):x}"),
                                 decode_step.__globals__, f"decode_step_{id(self):x}")
        self.fn = torch.compile(own, options=options) if self.compiled else decode_step

    @torch.inference_mode()
    def warmup(self, batch_size: int = 1) -> float:
        """Compile now (a throwaway state: a 17-token prefill, which also builds a compiled KDA chunk step where the
        model has ``kda_impl="compile"``, then one step), so timings after it are the model's own; returns the
        seconds it took."""
        t0 = time.perf_counter()
        state = self.model.new_state(batch_size, capacity=18)
        ids = torch.zeros(batch_size, 17, dtype=torch.long, device=self.model.device)
        self.model(ids, state, last_only=True)
        self(ids[:, :1], state)
        return time.perf_counter() - t0

    def __call__(self, ids: torch.Tensor, state=None, *, n_valid: torch.Tensor | None = None,
                 last_only: bool = True) -> torch.Tensor:
        B, T = ids.shape
        if state is None or T != 1 or not last_only or (n_valid is not None and bool((n_valid != 1).any())):
            return self.model(ids, state, n_valid=n_valid, last_only=last_only)
        L = int(state.lengths.max())
        if L < 2:
            return self.model(ids, state, last_only=True)
        kda = [s for s in state.layers if isinstance(s, KDAState)]
        mla = [s for s in state.layers if isinstance(s, MLAState)]
        # one row: [L, R + rope], whose strides do not depend on the cache's capacity (a [1, L, ...] view's do, and
        # dynamo would recompile for every capacity); several rows: [B, L, R + rope]
        past = [s.latent[0, :L] if B == 1 else s.latent[:, :L] for s in mla]
        for p in past:
            torch._dynamo.decorators.mark_unbacked(p, p.dim() - 2)
        ids = ids.clone(memory_format=torch.contiguous_format)  # canonical strides: no recompile for a [B, 1] view
        # freezing is read while dynamo traces (it lifts parameters as constants), so it is set around the call
        # (a compile option reaches inductor only); a config patch costs a few µs
        with torch._inductor.config.patch(freezing=self.frozen):
            logits, news = self.fn(self.model, ids, kda, past, state.lengths)
        rows = torch.arange(B, device=state.lengths.device)
        for s, new in zip(mla, news):
            s.ensure_capacity(L + 1)
            # an indexed write of B entries (scatter_ copied the whole cache buffer on CPU: ~15 µs at 700 slots)
            s.latent.index_put_((rows, state.lengths), new[:, 0].to(s.latent.dtype))
        state.lengths += 1
        return logits.unsqueeze(1)  # [B, 1, V]
