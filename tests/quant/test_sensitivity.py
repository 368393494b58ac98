"""Sensitivity-graded recipes: the allocator by hand and by brute force, the measurement on a tiny model, the CLI."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from kimiq import default_model_path
from kimiq.cli import main
from kimiq.config import TINY_HF, ModelConfig
from kimiq.model.weights import load_model, save_checkpoint, verify_checkpoint
from kimiq.quant.allocate import Option, allocate
from kimiq.quant.formats import get_format
from kimiq.quant.recipes import KEEP, PROTECTED_ROLES, load_recipe, plan_bytes, tensor_specs
from kimiq.quant.sensitivity import (
    PREDICTIONS_FILE,
    RECIPE_FILE,
    Sensitivity,
    _slot,
    auto_plan,
    budget_bytes,
    measure_sensitivity,
    weight_groups,
)
from tests.conftest import random_model

LADDER = ("q4_0", "q8_0")  # the tiny model's 64/128-wide rows take no k-quant; these run fast


# ----------------------------------------------------------------------------------------------- allocator
def test_allocator_by_hand():
    opts = {"a": [Option("a2", 2, 10.0), Option("a4", 4, 1.0)], "b": [Option("b2", 2, 5.0), Option("b4", 4, 4.0)]}
    pick = lambda budget: {g: o.format for g, o in allocate(opts, budget).choice.items()}
    assert pick(4) == {"a": "a2", "b": "b2"}
    assert pick(5) == {"a": "a2", "b": "b2"}
    assert pick(6) == {"a": "a4", "b": "b2"}  # the 2 bytes go where they save 9, not 1
    assert pick(8) == pick(100) == {"a": "a4", "b": "b4"}
    assert allocate(opts, 6).dkl == 6.0 and allocate(opts, 6).nbytes == 6
    with pytest.raises(ValueError, match="below the smallest plan"):
        allocate(opts, 3)


def test_allocator_prefers_less_kl_then_fewer_bytes():
    opts = {"a": [Option("worse", 4, 2.0), Option("better", 4, 1.0), Option("big", 8, 1.0)],
            "z": [Option("z8", 8, 0.0), Option("z2", 2, 0.0), Option("z4", 4, 0.0)]}
    got = allocate(opts, 100).choice
    assert got["a"].format == "better"  # same bytes, less KL; "big" is no better, so not worth its bytes
    assert got["z"].format == "z2"  # insensitive: the cheapest


def test_allocator_is_optimal_and_monotone():
    rng = random.Random(0)
    opts = {}
    for g in range(5):
        sizes = sorted(rng.sample(range(1, 40), 3))
        kls = sorted((rng.random() for _ in sizes), reverse=True)
        opts[f"g{g}"] = [Option(f"f{i}", s, k) for i, (s, k) in enumerate(zip(sizes, kls))]
    combos = list(itertools.product(*opts.values()))
    last = float("inf")
    for budget in range(sum(o[0].nbytes for o in opts.values()), 200, 3):
        a = allocate(opts, budget)
        brute = min(sum(o.dkl for o in c) for c in combos if sum(o.nbytes for o in c) <= budget)
        assert a.nbytes <= budget
        assert a.dkl == pytest.approx(brute, abs=1e-12)
        assert a.dkl <= last
        last = a.dkl
    # on a coarse grid the costs are rounded up: still within the budget
    coarse = allocate(opts, 100, resolution=16)
    assert coarse.nbytes <= 100 and coarse.dkl >= allocate(opts, 100).dkl


# ----------------------------------------------------------------------------------------------- measurement
@pytest.fixture(scope="module")
def tiny():
    model = random_model(ModelConfig.tiny(), seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_groups_cover_every_quantizable_tensor_once():
    cfg = ModelConfig.tiny()
    groups = weight_groups(cfg)
    names = [t for g in groups for t in g.tensors]
    assert len(names) == len(set(names))
    quantizable = {s.name for s in tensor_specs(cfg) if len(s.shape) == 2 and s.role not in PROTECTED_ROLES}
    assert set(names) == quantizable
    experts = [g for g in groups if "experts.*" in g.name]
    assert experts and all(len(g.tensors) == cfg.moe.num_experts for g in experts)
    assert any(g.name == "model.layers.1.block_sparse_moe.experts.*.w2.weight" for g in groups)


def test_measurement_is_deterministic_and_restores_weights(tiny):
    model, ids = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = measure_sensitivity(model, ids, LADDER, progress=False)
    b = measure_sensitivity(model, ids, LADDER, progress=False)
    assert a.dkl == b.dkl
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(d[KEEP] == 0.0 for d in a.dkl.values())
    # per group the small numbers are noisy (a routing flip weighs more than a q8_0 rounding); in sum, not
    assert sum(d["q8_0"] for d in a.dkl.values()) < 0.1 * sum(d["q4_0"] for d in a.dkl.values())


@torch.no_grad()
def test_partial_rerun_equals_full_forward(tiny):
    """A group's ΔKL from the cached layer inputs == quantizing it and running the whole model."""
    model, ids = tiny
    groups = [g for g in weight_groups(model.config) if g.layer == 2 and "experts" in g.name][:1]
    groups += [g for g in weight_groups(model.config) if g.role in ("embed", "lm_head")]
    sens = measure_sensitivity(model, ids, ("q4_0",), groups=groups, progress=False)
    base = torch.log_softmax(model(ids), -1)
    for g in groups:
        slots = [_slot(model, t) for t in g.tensors]
        saved = [s.clone() for s in slots]
        f = get_format("q4_0")
        for s in slots:
            s.copy_(f.dequantize(f.quantize(s), g.shape))
        lp = torch.log_softmax(model(ids), -1)
        for s, v in zip(slots, saved):
            s.copy_(v)
        kl = (base.exp() * (base - lp)).sum(-1).mean()
        assert sens.dkl[g.name]["q4_0"] == pytest.approx(float(kl), rel=1e-4, abs=1e-9), g.name


@torch.no_grad()
def test_insensitive_group_measures_zero_and_gets_the_cheapest_format(tiny):
    model, ids = tiny
    model = random_model(model.config, seed=5)
    model.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1's attention output no longer matters
    sens = measure_sensitivity(model, ids, LADDER, progress=False)
    cfg = model.config
    dead = [g.name for g in weight_groups(cfg) if g.layer == 1 and ".self_attn." in g.name and "o_proj" not in g.name]
    assert dead and all(sens.dkl[g]["q4_0"] == 0.0 for g in dead)
    full, _ = plan_bytes(cfg, {s.name: KEEP for s in tensor_specs(cfg)})
    plan = auto_plan(cfg, sens, full, LADDER)  # room for everything: only the insensitive get less
    assert all(plan.formats[g] == "q4_0" for g in dead)
    assert plan.formats["lm_head.weight"] == KEEP


def test_plan_is_a_loadable_recipe_within_budget(tiny, tmp_path):
    model, ids = tiny
    cfg = model.config
    sens = measure_sensitivity(model, ids, LADDER, progress=False)
    budget = budget_bytes(cfg, target_bpw=9.0)
    plan = auto_plan(cfg, sens, budget, LADDER, "custom")
    (tmp_path / "r.json").write_text(json.dumps(plan.recipe_json()))
    recipe = load_recipe(tmp_path / "r.json")
    formats = recipe.plan(cfg)
    assert plan_bytes(cfg, formats)[0] == plan.nbytes <= budget
    assert {f for f in formats.values()} <= {"q4_0", "q8_0", KEEP} and "q4_0" in formats.values()
    for s in tensor_specs(cfg):
        if s.role in PROTECTED_ROLES:
            assert formats[s.name] == KEEP
    assert abs(8 * plan.nbytes / plan.n_params - 9.0) < 0.1
    with pytest.raises(ValueError, match="smallest plan"):
        auto_plan(cfg, sens, budget_bytes(cfg, target_bpw=2.0), LADDER)
    pred = plan.predictions()
    assert pred["predicted_kld"] == pytest.approx(sum(g["dkl"] for g in pred["groups"]))
    again = Sensitivity.from_dict(json.loads(json.dumps(pred)))
    assert auto_plan(cfg, again, budget, LADDER, "custom").formats == plan.formats


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_target_bpw(tmp_path):
    """A tiny checkpoint with the default tokenizer: measure on 64 calibration tokens, allocate, write, reload."""
    cfg = ModelConfig.from_hf(dict(TINY_HF, vocab_size=4096, dtype="bfloat16"))
    tok_files = [default_model_path() / f for f in ("tiktoken.model", "tokenizer_config.json")]
    src = save_checkpoint(random_model(cfg, seed=1), tmp_path / "src", dtype=torch.bfloat16, extra_files=tok_files)
    out = tmp_path / "auto"
    argv = ["quantize", "-m", str(src), "-o", str(out), "--target-bpw", "7", "--family", "mlx", "--calib-tokens", "64"]
    assert main(argv) == 0
    assert verify_checkpoint(out).ok
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    pred = json.loads((out / PREDICTIONS_FILE).read_text())
    assert qc["recipe"] == pred["recipe"] and qc["recipe"].startswith("auto-mlx-")
    assert RECIPE_FILE in qc["recipe_doc"] and pred["bytes"] <= pred["budget_bytes"]
    assert pred["sensitivity"]["n_tokens"] == 64 and pred["sensitivity"]["split"] == "validation"
    assert qc["formats"] == {k: v for k, v in load_recipe(out / RECIPE_FILE).plan(cfg).items() if v != KEEP}
    with torch.no_grad():
        assert torch.isfinite(load_model(out)(torch.tensor([[1, 2, 3]]))).all()
    # reuse the measurements for another budget; test split refused; exactly one of recipe / target
    argv2 = ["quantize", "-m", str(src), "-o", str(tmp_path / "b"), "--target-bpw", "5", "--family", "mlx",
             "--sensitivity", str(out / PREDICTIONS_FILE)]
    assert main(argv2) == 0
    assert json.loads((tmp_path / "b" / PREDICTIONS_FILE).read_text())["bytes"] < pred["bytes"]
    assert main(["quantize", "-m", str(src), "-o", str(tmp_path / "c"), "-r", "q8_0", "--target-bpw", "5"]) == 2
