"""Prefill + token-by-token decode == one full forward; state snapshot/restore is exact."""

from __future__ import annotations

import pytest
import torch

from kimiq.model.mla import KimiMLAAttention
from tests.conftest import random_model

TOL_FP32 = 1e-4


def _full_logits(model, ids, lengths):
    return [model(ids[b : b + 1, : lengths[b]])[0] for b in range(len(lengths))]


@torch.inference_mode()
def test_prefill_then_decode_matches_full_forward(model_cfg):
    """fp32, batch 2, rows of different lengths (right-padded prefill, then one token per step)."""
    model = random_model(model_cfg, seed=3)
    lengths, prefill = [75, 48], [66, 9]  # one prefill crosses a chunk boundary, one is short
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model_cfg.vocab_size, (2, max(lengths)), generator=gen)
    full = _full_logits(model, ids, lengths)

    state = model.new_state(2)
    pre = torch.zeros(2, max(prefill), dtype=torch.long)
    for b in range(2):
        pre[b, : prefill[b]] = ids[b, : prefill[b]]
    out = model(pre, state, n_valid=torch.tensor(prefill))
    for b in range(2):
        torch.testing.assert_close(out[b, : prefill[b]], full[b][: prefill[b]], atol=TOL_FP32, rtol=0)

    pos = list(prefill)
    while any(p < n for p, n in zip(pos, lengths)):
        live = [p < n for p, n in zip(pos, lengths)]
        tok = torch.tensor([[ids[b, pos[b]] if live[b] else 0] for b in range(2)])
        step = model(tok, state, n_valid=torch.tensor([int(x) for x in live]))
        for b in range(2):
            if live[b]:
                torch.testing.assert_close(step[b, 0], full[b][pos[b]], atol=TOL_FP32, rtol=0)
                pos[b] += 1
    assert state.lengths.tolist() == lengths


@torch.inference_mode()
def test_last_only_and_chunked_prefill(model_cfg):
    model = random_model(model_cfg, seed=4)
    ids = torch.randint(3, model_cfg.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    state = model.new_state(1)
    for a, b in ((0, 30), (30, 31), (31, 100)):  # uneven pieces, including a single token
        last = model(ids[:, a:b], state, last_only=True)
        torch.testing.assert_close(last[0, 0], full[0, b - 1], atol=TOL_FP32, rtol=0)


@torch.inference_mode()
def test_snapshot_restore_is_exact(model_cfg):
    model = random_model(model_cfg, seed=5)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model_cfg.vocab_size, (2, 40), generator=gen)
    state = model.new_state(2)
    model(ids[:, :30], state)
    snap = state.snapshot()
    a = model(ids[:, 30:35], state)
    model(ids[:, 35:40], state)  # move on, then roll back
    state.restore(snap)
    assert state.lengths.tolist() == [30, 30]
    b = model(ids[:, 30:35], state)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ahead = state.snapshot()
    ahead.lengths += 1
    with pytest.raises(ValueError, match="ahead"):
        state.restore(ahead)


@torch.inference_mode()
def test_absorbed_mla_equals_expanded(model_cfg):
    model = random_model(model_cfg, seed=6)
    attn = next(l.self_attn for l in model.model.layers if isinstance(l.self_attn, KimiMLAAttention))
    x = torch.randn(2, 3, model_cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    q = attn.q_proj(x).view(2, 3, attn.num_heads, -1)
    kv = attn.latent(torch.randn(2, 9, model_cfg.hidden_size, generator=torch.Generator().manual_seed(4)))
    mask = torch.rand(2, 3, 9, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attn._absorbed(q, kv, mask), attn._expanded(q, kv, mask), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_bf16_runs_and_stays_close(model_cfg):
    model = random_model(model_cfg, seed=7)
    ids = torch.randint(3, model_cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(6))
    ref = model(ids)
    model.to_dtype(torch.bfloat16)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n.endswith(("A_log", "dt_bias", "gate.weight")) else torch.bfloat16), n
    state = model.new_state(1)
    assert state.layers[0].recurrent.dtype == torch.float32
    out = model(ids[:, :45], state)
    for t in range(45, 50):
        out = torch.cat([out, model(ids[:, t : t + 1], state)], dim=1)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel
