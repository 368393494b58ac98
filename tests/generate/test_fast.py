"""The compiled decode step against the model's own forward: logits and state, per dtype tolerance."""

from __future__ import annotations

import pytest
import torch

from kimiq.config import ModelConfig
from kimiq.generate.engine import generate_tokens
from kimiq.generate.fast import DecodeStep
from kimiq.generate.sampling import SamplingParams
from kimiq.model.state import KDAState
from tests.conftest import TWO_MLA_TWO_DENSE_HF, random_model

TOL = {torch.float32: 2e-5, torch.bfloat16: 0.1}  # max |Δlogit|; logits of these models are O(1-10)


def _states_close(a, b, lengths, tol):
    for sa, sb in zip(a.layers, b.layers):
        if isinstance(sa, KDAState):
            for ta, tb in zip(sa.tensors(), sb.tensors()):
                torch.testing.assert_close(ta.float(), tb.float(), atol=tol, rtol=0)
        else:  # MLA: the slots before each row's length
            for r, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(sa.latent[r, :n].float(), sb.latent[r, :n].float(), atol=tol, rtol=0)


def _run(model, step, dtype, *, ragged: bool, n_steps: int = 5):
    """Prefill ragged rows into two states, then decode the same tokens with ``model`` and ``step``."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    B, T = 2, 9
    ids = torch.randint(0, V, (B, T), generator=gen)
    n_valid = torch.tensor([T, 4]) if ragged else None
    ref, got = model.new_state(B, capacity=4), model.new_state(B, capacity=4)  # both grow on the way
    with torch.inference_mode():
        model(ids, ref, n_valid=n_valid)
        model(ids, got, n_valid=n_valid)
        worst = 0.0
        for _ in range(n_steps):
            tok = torch.randint(0, V, (B, 1), generator=gen)
            a = model(tok, ref, last_only=True)
            b = step(tok, got)
            assert b.shape == a.shape == (B, 1, V)
            worst = max(worst, float((a - b).abs().max()))
        assert torch.equal(ref.lengths, got.lengths)
        _states_close(ref, got, ref.lengths, 1e-4 if dtype == torch.float32 else 5e-2)
    assert worst <= TOL[dtype], worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hf", ["tiny", "two_mla"])
def test_decode_step_matches_the_model(hf, dtype):
    cfg = ModelConfig.tiny() if hf == "tiny" else ModelConfig.from_hf(TWO_MLA_TWO_DENSE_HF)
    model = random_model(cfg, seed=2).to_dtype(dtype)
    _run(model, DecodeStep(model, compile=False), dtype, ragged=hf == "two_mla")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_step_matches_the_model(dtype):
    """inductor's graph (fused expert gather, absorbed MLA over a dynamic-length cache; at bf16 the cache products
    as fused multiply-reduces) == the reference forward; the cache length changes every step, so this also checks
    that one graph serves them (no recompiles)."""
    model = random_model(ModelConfig.tiny(), seed=4).to_dtype(dtype)
    step = DecodeStep(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        _run(model, step, dtype, ragged=True, n_steps=6)


def test_max_autotune_decode_step_matches_the_model():
    """mode="max-autotune": inductor's C++ GEMM templates on frozen weights and a C++ wrapper; same logits."""
    model = random_model(ModelConfig.tiny(), seed=5)
    step = DecodeStep(model, mode="max-autotune")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        _run(model, step, torch.float32, ragged=True, n_steps=4)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="max-autotune"):
        DecodeStep(random_model(ModelConfig.tiny(), seed=5), mode="fast")


def test_engine_uses_the_step_and_keeps_greedy_output():
    model = random_model(ModelConfig.tiny(), seed=1)
    calls = []

    class Counting(DecodeStep):
        def __call__(self, ids, state=None, **kw):
            calls.append(ids.shape)
            return super().__call__(ids, state, **kw)

    prompts = [[5, 6, 7, 8], [9, 10]]
    want = [s.tokens for s in generate_tokens(model, prompts, SamplingParams(temperature=0), max_new_tokens=6)]
    got = [s.tokens for s in generate_tokens(model, prompts, SamplingParams(temperature=0), max_new_tokens=6,
                                             decode=Counting(model, compile=False))]
    assert got == want
    assert len(calls) == 5 and all(c == (2, 1) for c in calls)


@pytest.mark.parametrize("cxx_ops", [True, False])
def test_compiled_decode_step_with_quantized_modules(cxx_ops, monkeypatch):
    """Quantized linears, experts and embedding enter the graph as kimiq_cpu C++ operators (kimiq.ops.qops) or,
    without them, as opaque Python custom ops (kimiq.quant.opaque): either way the compiled step gives the
    quantized model's own logits, and with the C++ operators no Python op runs in a step."""
    from kimiq.ops import qops
    from kimiq.quant import opaque
    from kimiq.quant.modules import quantize

    model = quantize(random_model(ModelConfig.tiny(), seed=6), "q8_0")
    if cxx_ops:
        step = DecodeStep(model)
        assert qops.loaded(), qops._State.error
        calls = []
        real = opaque._module
        monkeypatch.setattr(opaque, "_module", lambda h: calls.append(h) or real(h))
    else:
        monkeypatch.setattr(qops, "loaded", lambda: False)
        step = DecodeStep(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        _run(model, step, torch.float32, ragged=False, n_steps=4)
    if cxx_ops:
        assert calls == []


def test_two_steps_keep_their_own_graphs():
    """Graphs are not guarded on the model's modules (that cost a third of a step), so each step must own its
    graphs: two models of one config, one float and one quantized, compiled one after the other, each get their
    own logits (sharing one code object, the second reused the first's graph and failed)."""
    from kimiq.quant.modules import quantize

    a, b = random_model(ModelConfig.tiny(), seed=7), quantize(random_model(ModelConfig.tiny(), seed=8), "q8_0")
    torch._dynamo.reset()
    for model in (a, b):
        _run(model, DecodeStep(model), torch.float32, ragged=False, n_steps=3)


def test_cli_generate_compile_gives_the_same_greedy_text(capsys):
    """`kimiq generate --compile` (compiled KDA chunk step for the prefill, compiled decode step) on the default
    model: the same greedy continuation as eager (fp32; the graphs differ from eager by ~1e-6 in the logits)."""
    from kimiq.cli import main

    argv = ["generate", "-p", "def add(a, b):", "-n", "12"]
    assert main(argv) == 0
    eager = capsys.readouterr()
    assert main(argv + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and "compiled in" in compiled.err


@pytest.mark.parametrize("rank", [64, 40])
def test_decode_step_with_the_cpu_operators_any_latent_width(rank):
    """With kimiq's C++ operators loaded, the step runs kda_step and mla_decode, whose last 16 latent columns are
    masked (width 64 + 16: none, 40 + 16 = 56: 8 of them), and matches the model either way."""
    from kimiq.ops import qops

    assert qops.available(), qops._State.error
    model = random_model(ModelConfig.from_hf(dict(TWO_MLA_TWO_DENSE_HF, kv_lora_rank=rank)), seed=3)
    _run(model, DecodeStep(model, compile=False), torch.float32, ragged=True)


def test_bf16_cache_for_an_fp32_model():
    """model.cache_dtype = bf16: new_state allocates bf16 latent caches (half the bytes), the compiled step (with the
    C++ operators: mla_decode over a bf16 cache, fp32 queries) matches the forward over the same cache, and the
    logits move from the fp32-cache ones by bf16 rounding only."""
    from kimiq.ops import qops

    assert qops.available(), qops._State.error
    model = random_model(ModelConfig.from_hf(TWO_MLA_TWO_DENSE_HF), seed=6)
    full = model.new_state(1, capacity=64)
    model.cache_dtype = torch.bfloat16
    half = model.new_state(1, capacity=64)
    mla = [i for i, s in enumerate(half.layers) if not isinstance(s, KDAState)]
    assert mla and all(half.layers[i].latent.dtype == torch.bfloat16 for i in mla)
    assert full.nbytes - half.nbytes == sum(full.layers[i].latent.nbytes // 2 for i in mla)
    step = DecodeStep(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        _run(model, step, torch.bfloat16, ragged=True)  # bf16: the tolerances of a rounded cache (bf16 dots too)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = model(ids, model.new_state(1, cache_dtype=torch.float32))
        b = model(ids, model.new_state(1))
    assert 0 < float((a - b).abs().max()) <= TOL[torch.bfloat16]
