"""GGUF export: the layout llama.cpp's kimi-linear loader checks, values, quantized blocks, the BPE merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimiq import default_model_path, load
from kimiq.cli import main
from kimiq.export.gguf import byte_to_unicode, export_gguf
from kimiq.quant.checkpoint import quantize_checkpoint
from kimiq.tokenizer import PAT_STR

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    return gguf.GGUFReader(str(export_gguf(default_model_path(), tmp_path_factory.mktemp("g") / "m.gguf",
                                           outtype="f32", log=lambda s: None)))


def _t(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _arr(reader, name) -> np.ndarray:
    t = _t(reader, name)
    return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])


def test_layout_and_values(f32_gguf):
    r = f32_gguf
    model, tok = load(dtype=torch.float32)
    cfg = model.config
    # 3 + 2L + 15 KDA + 6 MLA + 3 dense + 8 MoE tensors per layer (docs/dev/gguf-kimi-linear.md §2)
    n_kda, n_mla = cfg.layer_types.count("kda"), cfg.layer_types.count("mla")
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    assert len(r.tensors) == 3 + 2 * cfg.num_hidden_layers + 15 * n_kda + 6 * n_mla + 3 * (8 - n_moe) + 8 * n_moe
    assert r.fields["general.architecture"].contents() == "kimi-linear"
    assert r.fields["kimi-linear.attention.head_count_kv"].contents() == [int(t == "mla") for t in cfg.layer_types]
    assert abs(r.fields["kimi-linear.expert_weights_scale"].contents() - cfg.moe.routed_scaling_factor) < 1e-6
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == cfg.vocab_size == tok.vocab_size
    L0 = model.model.layers[0].self_attn
    np.testing.assert_array_equal(_arr(r, "blk.0.attn_q.weight"), L0.q_proj.weight.detach().numpy())
    np.testing.assert_allclose(_arr(r, "blk.0.ssm_a").reshape(-1), -L0.A_log.detach().exp().reshape(-1).numpy(),
                               rtol=1e-6)
    assert [int(d) for d in _t(r, "blk.0.ssm_conv1d_q.weight").shape] == [4, 1, 256, 1]
    mla = model.model.layers[3].self_attn
    m = cfg.mla
    kv_b = mla.kv_b_proj.weight.detach().view(m.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    np.testing.assert_array_equal(_arr(r, "blk.3.attn_k_b.weight"),
                                  kv_b[:, : m.qk_nope_head_dim].transpose(1, 2).numpy())
    np.testing.assert_array_equal(_arr(r, "blk.3.attn_v_b.weight"), kv_b[:, m.qk_nope_head_dim:].numpy())
    ex = model.model.layers[1].block_sparse_moe.experts
    assert [int(d) for d in _t(r, "blk.1.ffn_down_exps.weight").shape] == [256, 256, 6]
    np.testing.assert_array_equal(_arr(r, "blk.1.ffn_down_exps.weight"), ex.w2.detach().numpy())
    for name in ("blk.1.ffn_gate_inp.weight", "blk.0.ssm_norm.weight", "blk.1.exp_probs_b.bias"):
        assert _t(r, name).tensor_type.name == "F32"


def test_merges_reproduce_tiktoken(f32_gguf):
    """Byte-level BPE with the exported merge list gives tiktoken's tokens (pieces split by the Kimi pattern)."""
    import regex

    _, tok = load()
    fields = f32_gguf.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    rank = {tuple(mg.split(" ")): i for i, mg in enumerate(fields["tokenizer.ggml.merges"].contents())}
    tid = {t: i for i, t in enumerate(tokens)}
    enc = byte_to_unicode()
    text = open(__file__, encoding="utf-8").read()[:4000] + " héllo wörld 123456 \t\n  x"
    ours = []
    for piece in regex.findall(PAT_STR, text, flags=regex.V1):
        parts = [enc[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ours += [tid[p] for p in parts]
    assert ours == tok.encode(text)


def test_quantized_exports(tmp_path):
    """--type q8_0 quantizes with kimiq's llama.cpp-exact blocks; a q4_k_m checkpoint exports its own blocks."""
    path = export_gguf(default_model_path(), tmp_path / "q8.gguf", outtype="q8_0", log=lambda s: None)
    r = gguf.GGUFReader(str(path))
    model, _ = load(dtype=torch.float32)
    t = _t(r, "blk.0.attn_q.weight")
    assert t.tensor_type.name == "Q8_0"
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(_arr(r, "blk.0.attn_q.weight") - w).max() <= np.abs(w).max() / 127
    q4 = quantize_checkpoint(default_model_path(), "q4_k_m", tmp_path / "q4", progress=False, log=lambda s: None)
    assert main(["export", "-m", str(q4), "--gguf", str(tmp_path / "q4.gguf")]) == 0
    r4 = gguf.GGUFReader(str(tmp_path / "q4.gguf"))
    qm, _ = load(q4, dtype=torch.float32)
    t = _t(r4, "blk.1.ffn_gate_exps.weight")
    assert t.tensor_type.name == "Q4_K" and [int(d) for d in t.shape] == [256, 256, 6]
    stored = torch.stack([qm.model.layers[1].block_sparse_moe.experts._parts("w1")["weight"][e] for e in range(6)])
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), stored.numpy().reshape(-1))
    assert _t(r4, "output.weight").tensor_type.name == "Q6_K"
    assert _t(r4, "blk.3.attn_k_b.weight").tensor_type.name == "Q5_0"  # 64-wide rows: llama.cpp's fallback
