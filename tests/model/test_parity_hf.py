"""Parity with transformers' native KimiLinearForCausalLM (pure-torch path, no fla/triton).

Random small configs written in the ORIGINAL checkpoint layout by ``tests.reference.hf_kimi``,
loaded by kimiq's loader: max |logit diff| <= 1e-4 in fp32 over >= 64 tokens, batch 2, for a
full forward and for kimiq's prefill + decode path; greedy decode through both caches agrees.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.kimi_linear")
from tests.reference.hf_kimi import PRESETS, TINY, build_hf_checkpoint, build_hf_model, hf_greedy, hf_logits  # noqa: E402

from kimiq.config import ModelConfig  # noqa: E402
from kimiq.model.weights import load_model  # noqa: E402

TOL = 1e-4
T = 80  # >= 64 tokens, crosses a 64-token chunk boundary


@pytest.fixture(scope="module", params=sorted(PRESETS))
def checkpoint(request, tmp_path_factory):
    cfg = PRESETS[request.param]
    path = build_hf_checkpoint(cfg, tmp_path_factory.mktemp(request.param), seed=11, n_shards=3)
    hf = build_hf_model(cfg, seed=11, dtype=torch.float32)
    return request.param, cfg, path, hf


def _ids(cfg, B=2, seed=0):
    return torch.randint(3, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_full_forward_matches_transformers(checkpoint):
    name, cfg, path, hf = checkpoint
    ids = _ids(cfg)
    ref = hf_logits(path, ids, model=hf)
    model = load_model(path, dtype=torch.float32)
    out = model(ids)
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.3g} > {TOL}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


@torch.inference_mode()
def test_prefill_decode_matches_transformers(checkpoint):
    """kimiq's stateful path (ragged batch 2, prefill then single tokens) against transformers' full forward."""
    name, cfg, path, hf = checkpoint
    ids = _ids(cfg, seed=1)
    ref = hf_logits(path, ids, model=hf)
    model = load_model(path, dtype=torch.float32)
    state = model.new_state(2)
    n0 = torch.tensor([70, 20])
    pre = ids[:, :70].clone()
    out = model(pre, state, n_valid=n0)
    worst = max((out[b, : n0[b]] - ref[b, : n0[b]]).abs().max().item() for b in range(2))
    pos = n0.clone()
    while bool((pos < T).any()):
        live = (pos < T).long()
        tok = ids.gather(1, pos.clamp(max=T - 1).view(2, 1))
        step = model(tok, state, n_valid=live)
        for b in range(2):
            if live[b]:
                worst = max(worst, (step[b, 0] - ref[b, pos[b]]).abs().max().item())
        pos += live
    assert worst <= TOL, f"{name}: max |logit diff| {worst:.3g} > {TOL}"


@torch.inference_mode()
def test_greedy_decode_matches_transformers(checkpoint):
    name, cfg, path, hf = checkpoint
    prompt = _ids(cfg, B=1, seed=2)[:, :32]
    ref = hf_greedy(path, prompt, 32, model=hf)
    model = load_model(path, dtype=torch.float32)
    state = model.new_state(1)
    tok = model(prompt, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
    got = [int(tok)]
    for _ in range(31):
        tok = model(tok, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
        got.append(int(tok))
    assert got == ref


def test_config_parses_like_transformers():
    cfg = ModelConfig.from_hf(TINY)
    assert cfg.layer_types == ("kda", "kda", "kda", "mla")
    assert [cfg.is_moe(i) for i in range(4)] == [False, True, True, True]
