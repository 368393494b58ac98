"""Memory planner: the 48B's published per-token cache and state figures, the engine's own state sizes, budget
search, the CLI, and the prediction against a measured CPU prefill of the default model."""

from __future__ import annotations

import pytest
import torch

from kimiq import default_model_path
from kimiq.quant.modules import int4_repacked
from kimiq.cli import main
from kimiq.config import KIMI_LINEAR_48B_HF, ModelConfig
from kimiq.eval.plan import (
    DEVICES,
    GiB,
    MiB,
    Planner,
    kda_state_bytes,
    measure_prefill,
    mla_bytes_per_token,
    parse_size,
    weight_footprint,
)
from kimiq.model.model import KimiLinearForCausalLM
from kimiq.quant.recipes import KEEP, get_recipe


@pytest.fixture(scope="module")
def real() -> ModelConfig:
    return ModelConfig.from_hf(KIMI_LINEAR_48B_HF)


@pytest.fixture(scope="module")
def default_cfg() -> ModelConfig:
    return ModelConfig.from_file(default_model_path())


# ---------------------------------------------------------------------------------------------- 48B anchors
def test_48b_mla_cache_per_token(real):
    # quantization-formats.md §7.2 table: 576 latent values per MLA layer (MLX / V-less llama.cpp) = 8,064 B/token
    # at bf16, 7.875 GiB per 2^20 tokens; separate K (576) + V (512) latents = 15,232 B/token, 14.875 GiB
    assert mla_bytes_per_token(real, 2) == 8064
    assert mla_bytes_per_token(real, 2) * 2**20 / GiB == 7.875
    assert mla_bytes_per_token(real, 2, separate_v=True) == 15232
    assert mla_bytes_per_token(real, 2, separate_v=True) * 2**20 / GiB == 14.875
    # kimi-linear-architecture.md §4: "4032 values = 8064 bytes bf16 per token over the 7 MLA layers"
    assert mla_bytes_per_token(real, 1) == 4032


def test_48b_kda_state(real):
    rec, conv_bf16 = kda_state_bytes(real, 2)
    _, conv_f32 = kda_state_bytes(real, 4)
    # kimi-linear-architecture.md §3.7: recurrent S [32, 128, 128] fp32 = 2 MiB per layer, 40 MiB for 20 layers
    assert rec == 40 * MiB
    # quantization-formats.md §7.2 (llama.cpp, f32 state): conv 3*3*4096 = 36,864 + S 524,288 values per layer,
    # 2.14 MiB per layer, "42.8 MiB for 20 layers"
    assert conv_f32 == 20 * 36_864 * 4
    assert round((rec + conv_f32) / 20 / MiB, 2) == 2.14 and round((rec + conv_f32) / MiB, 1) == 42.8
    # kimiq keeps the conv taps in the model dtype
    assert rec + conv_bf16 == 20 * (524_288 * 4 + 36_864 * 2)


def test_48b_context_arithmetic_of_section_7_4(real):
    # quantization-formats.md §7.4: "32 GiB card = 34.36 GB. Q4_K_M 29.70 GB + 128k x 15,232 B = 2.00 GB leaves
    # ~2.7 GB"; "MXFP4_MOE 27.21 GB + 240k x 15,232 B = 3.74 GB"
    card = parse_size("32GiB")
    assert round(card / 1e9, 2) == 34.36
    kv = mla_bytes_per_token(real, 2, separate_v=True)
    assert round(128 * 1024 * kv / 1e9, 2) == 2.00 and round(240 * 1024 * kv / 1e9, 2) == 3.74
    q4 = weight_footprint(real, "q4_k_m")  # kimiq keeps 1-D tensors in bf16, GGUF in f32: within 0.02 GB
    mx = weight_footprint(real, "mxfp4_moe")
    assert abs(q4.nbytes / 1e9 - 29.70) < 0.02 and abs(mx.nbytes / 1e9 - 27.21) < 0.02
    assert q4.n_params == 49_122_681_728
    assert abs((card - q4.nbytes - 128 * 1024 * kv) / 1e9 - 2.7) < 0.05


def test_48b_plan_and_budget(real):
    p = Planner(real, weight_footprint(real, "q4_k_m"), "bfloat16", DEVICES["cuda"], 512)
    n = p.max_context(parse_size("32GiB"))
    assert 0 < n < 128 * 1024  # kimiq's expanded MLA prefill needs more than llama.cpp's cache-only figure
    assert p.plan(n).fits(parse_size("32GiB")) and not p.plan(n + 1).fits(parse_size("32GiB"))
    assert p.plan(n).mla_per_token == 8064 and p.plan(n).kda_state == 43_417_600
    assert p.max_context(parse_size("24GiB")) == 0  # 29.7 GB of weights do not fit a 24 GiB card
    cpu = Planner(real, p.weights, "bfloat16", DEVICES["cpu"], 512)
    assert cpu.plan(n).workspace > p.plan(n).workspace  # CPU flash attention needs v padded to the q/k dim


# ---------------------------------------------------------------------------------------------- engine agreement
@pytest.mark.parametrize("cache", ["", "bfloat16"], ids=["cache-model-dtype", "cache-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_bytes_equal_the_engines_allocation(default_cfg, dtype, cache):
    with torch.device("meta"):
        model = KimiLinearForCausalLM(default_cfg).to_dtype(dtype)
    model.cache_dtype = getattr(torch, cache) if cache else None
    name = "float32" if dtype == torch.float32 else "bfloat16"
    p = Planner(default_cfg, weight_footprint(default_cfg, dtype=name), name, cache_dtype=cache)
    for batch, ctx in [(1, 100), (3, 4096)]:
        state = model.new_state(batch, capacity=ctx)
        plan = p.plan(ctx, batch)
        assert plan.kda_state + plan.mla_cache == state.nbytes
    n_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert p.weights.nbytes == n_bytes


def test_quantized_checkpoint_formats(default_cfg):
    plan = get_recipe("q8_0").plan(default_cfg)
    formats = {k: v for k, v in plan.items() if v != KEEP}
    ckpt, recipe = weight_footprint(default_cfg, formats=formats), weight_footprint(default_cfg, "q8_0")
    assert (ckpt.nbytes, ckpt.n_params) == (recipe.nbytes, recipe.n_params) and "checkpoint" in ckpt.label
    with pytest.raises(ValueError):
        weight_footprint(default_cfg, "q4_k_m", formats=formats)


def test_cpu_int4_repack_and_dequant_phase(default_cfg):
    w = weight_footprint(default_cfg, "affine4-g64", dtype="float32")
    assert w.int4_repack > 0 and w.max_dequant >= w.max_dequant_cpu > 0  # affine4 linears whose out % 64 != 0
    q4k = weight_footprint(default_cfg, "q4_k_m", dtype="float32")  # Q4_K: repacked only where no int8 kernel
    assert (q4k.int4_repack > 0) == int4_repacked("q4_k")
    cpu = Planner(default_cfg, w, "float32", DEVICES["cpu"]).plan(1024)
    cuda = Planner(default_cfg, w, "float32", DEVICES["cuda"]).plan(1024)
    assert cpu.int4_repack == w.int4_repack and cuda.int4_repack == 0
    assert cpu.phases["dequantized weight"] >= w.max_dequant_cpu * 4
    assert "dequantized weight" not in Planner(default_cfg, weight_footprint(default_cfg)).plan(1024).phases


def test_budget_search(default_cfg):
    p = Planner(default_cfg, weight_footprint(default_cfg, dtype="float32"), "float32", DEVICES["cpu"], 512)
    budget = parse_size("1GiB")
    n = p.max_context(budget)
    assert p.plan(n).fits(budget) and not p.plan(n + 1).fits(budget)
    rows = p.max_batch(budget, 2048)
    assert rows >= 1 and p.plan(2048, rows).fits(budget) and not p.plan(2048, rows + 1).fits(budget)
    assert p.max_context(parse_size("100MiB")) == 0  # less than the runtime overhead
    # the peak is at the end: a context that ends with a partial chunk is planned at its last full chunk too
    assert p.plan(1025).workspace >= p.plan(1024).workspace


def test_parse_size():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == parse_size("24G") == parse_size("24") == 24 * GiB
    assert parse_size("512MiB") == 512 * MiB and parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_default_model_table(capsys):
    assert main(["plan", "--recipes", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "2,304 B (float32" in out and "max context, batch 1" in out and "q8_0" in out


def test_cli_48b(capsys):
    args = ["plan", "-m", "48b", "--memory", "32GiB", "-r", "q4_k_m", "--device", "cuda", "--context", "65536"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8,064 B" in out and "15,232 B" in out and "29.69 GB" in out and "rows of 65,536 tokens that fit: 1" in out
    assert main(["plan", "--config", "kimi-linear-48b", "--context", "1000", "-r", "nope"]) == 2


# ---------------------------------------------------------------------------------------------- measured
def _check(context: int, chunk: int, cache_dtype: str = "") -> None:
    cfg = ModelConfig.from_file(default_model_path())
    m = measure_prefill(None, context, chunk, dtype="float32", cache_dtype=cache_dtype)
    pred = Planner(cfg, weight_footprint(cfg, dtype="float32"), "float32", DEVICES["cpu"], chunk,
                   cache_dtype=cache_dtype).plan(context)
    err = (pred.model_bytes - m.peak) / m.peak
    assert abs(err) < 0.15, f"predicted {pred.model_bytes / MiB:.1f} MiB, measured {m.peak / MiB:.1f} MiB"
    assert m.state == pred.kda_state + pred.mla_cache


def test_prediction_matches_measured_prefill_peak():
    """4k tokens in 4 chunks of 1024: weights 57 MiB, MLA attention workspace ~46 MiB, logits 16 MiB, allocator
    slack at its 16 MiB floor (at 2k the measured peak varies by ~15 MiB from run to run: too noisy for 15%)."""
    _check(4096, 1024)


def test_prediction_matches_measured_prefill_peak_bf16_cache():
    """An fp32 model with a bf16 latent cache: half the cache, plus the fp32 copy each MLA layer reads back."""
    _check(4096, 1024, "bfloat16")


@pytest.mark.slow
def test_prediction_matches_measured_prefill_peak_16k():
    _check(16384, 512)
