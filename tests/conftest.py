"""Shared fixtures: small random Kimi-Linear models in fp32 with every weight mattering."""

from __future__ import annotations

import pytest
import torch

from kimiq.config import TINY_HF, ModelConfig
from kimiq.model.model import KimiLinearForCausalLM

# >= 2 MLA layers and >= 2 dense layers, grouped routing exercised.
TWO_MLA_TWO_DENSE_HF = dict(
    TINY_HF,
    num_hidden_layers=8,
    first_k_dense_replace=2,
    num_experts=8,
    num_experts_per_token=2,
    num_expert_group=2,
    topk_group=1,
    linear_attn_config=dict(TINY_HF["linear_attn_config"], kda_layers=[1, 2, 3, 5, 6, 7], full_attn_layers=[4, 8]),
)


def random_model(cfg: ModelConfig, seed: int = 0) -> KimiLinearForCausalLM:
    """init_weights + perturbations so norms and router bias are not constants."""
    model = KimiLinearForCausalLM(cfg).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith("dt_bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model.eval()


@pytest.fixture(params=["tiny", "two_mla_two_dense"])
def model_cfg(request) -> ModelConfig:
    return ModelConfig.tiny() if request.param == "tiny" else ModelConfig.from_hf(TWO_MLA_TWO_DENSE_HF)
