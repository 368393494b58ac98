"""Importance-matrix collection (kimiq/quant/imatrix.py) against hand-computed activations."""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kimiq.cli import main
from kimiq.config import ModelConfig
from kimiq.model.model import KimiLinearForCausalLM
from kimiq.quant.imatrix import collect_imatrix
from kimiq.quant.modules import quantize


def _model():
    return KimiLinearForCausalLM(ModelConfig.tiny()).init_weights(0).eval()


def test_linear_and_experts_match_hand_computed():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    moe_in: dict[str, tuple] = {}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("down", a[0].reshape(-1, a[0].shape[-1]).clone()))]
    layer = next(i for i, lyr in enumerate(model.model.layers) if hasattr(lyr, "block_sparse_moe"))
    exp = model.model.layers[layer].block_sparse_moe.experts
    hooks.append(exp.register_forward_pre_hook(lambda m, a: moe_in.__setitem__("x", (a[0].clone(), a[2].clone()))))
    imat = collect_imatrix(model, [ids])
    for h in hooks:
        h.remove()
    x = seen["down"]
    torch.testing.assert_close(imat["model.layers.0.mlp.down_proj.weight"], x.pow(2).mean(0))
    xin, idx = moe_in["x"]
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    for e in range(exp.w1.shape[0]):
        rows = (idx == e).any(-1)
        if rows.any():
            xe = xin[rows]
            torch.testing.assert_close(imat[f"{prefix}.{e}.w1.weight"], xe.pow(2).mean(0))
            h = F.silu(xe @ exp.w1[e].t()) * (xe @ exp.w3[e].t())
            torch.testing.assert_close(imat[f"{prefix}.{e}.w2.weight"], h.pow(2).mean(0))
        else:
            assert torch.equal(imat[f"{prefix}.{e}.w1.weight"], torch.ones(exp.w1.shape[2]))
    assert "lm_head.weight" not in imat


def test_cli_writes_file_that_quantize_uses(tmp_path):
    out = tmp_path / "imatrix.safetensors"
    assert main(["imatrix", "-o", str(out), "--limit-tokens", "256", "--ctx", "128"]) == 0
    imat = load_file(str(out))
    assert "model.layers.1.self_attn.q_proj.weight" in imat and all(torch.isfinite(v).all() for v in imat.values())
    # weighted quantization differs from unweighted for a k-quant and is still valid
    from kimiq import load

    a, _ = load(None, dtype=torch.float32)
    b, _ = load(None, dtype=torch.float32)
    quantize(a, "q4_k_m")
    quantize(b, "q4_k_m", imatrix=imat)
    wa = a.model.layers[1].self_attn.q_proj.weight
    wb = b.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(wa, wb)
