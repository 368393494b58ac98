"""Kimi-Linear causal LM: the decoder stack and the one forward contract.

    logits = model(input_ids)                          # full forward, no state: [B, T, V]
    state  = model.new_state(batch_size)
    logits = model(input_ids, state, n_valid=n)        # prefill / decode; updates state in place

Module and parameter names are the checkpoint's (``model.layers.L.self_attn.q_proj.weight``
...), except that routed experts are stacked (``block_sparse_moe.experts.w1`` [E, I, D]);
``kimiq.model.weights`` maps between the two.  Decoder block (pre-norm)::

    h   = x + attn(input_layernorm(x))       attn: KDA or MLA per cfg.layer_types
    out = h + ffn(post_attention_layernorm(h))   ffn: dense ``mlp`` or ``block_sparse_moe``

No embedding scale, no logit scale, untied ``lm_head``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kimiq.config import LAYER_KDA, ModelConfig
from kimiq.model.kda import KimiDeltaAttention
from kimiq.model.layers import MLP, RMSNorm
from kimiq.model.mla import KimiMLAAttention
from kimiq.model.moe import SparseMoE
from kimiq.model.state import KDAState, MLAState, ModelState

__all__ = ["KimiLinearForCausalLM", "DecoderLayer", "FP32_PARAM_SUFFIXES", "keep_fp32"]

# Parameters kept in fp32 whatever the model dtype (mlx-lm ``cast_predicate``; vLLM allocates
# them fp32): decay and router parameters, whose bf16 rounding changes behaviour.
FP32_PARAM_SUFFIXES = ("A_log", "dt_bias", "gate.weight", "gate.e_score_correction_bias")


def keep_fp32(name: str) -> bool:
    return name.endswith(FP32_PARAM_SUFFIXES) and ("block_sparse_moe.gate" in name or "self_attn" in name)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, *, kda_impl: str = "torch"):
        super().__init__()
        self.layer_type = cfg.layer_types[i]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.layer_type == LAYER_KDA:
            self.self_attn: nn.Module = KimiDeltaAttention(cfg, i, impl=kda_impl)
        else:
            self.self_attn = KimiMLAAttention(cfg, i)
        if cfg.is_moe(i):
            assert cfg.moe is not None
            self.block_sparse_moe = SparseMoE(cfg.hidden_size, cfg.moe, cfg.router_bias_in_weights)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_sparse_moe(x) if hasattr(self, "block_sparse_moe") else self.mlp(x)

    def forward(self, x, state=None, lengths=None, valid=None, n_valid=None):
        h = self.input_layernorm(x)
        if self.layer_type == LAYER_KDA:
            a = self.self_attn(h, state, valid, n_valid)
        else:
            a = self.self_attn(h, state, lengths)
        x = x + a
        return x + self.ffn(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    """``model.*`` in the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig, kda_impl: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, kda_impl=kda_impl) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KimiLinearForCausalLM(nn.Module):
    # dtype of the MLA latent caches ``new_state`` allocates; None = the model dtype.  bf16 for an fp32 model halves
    # the cache (llama.cpp's default KV cache is f16 whatever the weights) and speeds long-context decode; cached
    # latents are rounded once, attention still computes in the model dtype (fp32 accumulation in mla_decode)
    cache_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig, *, kda_impl: str = "torch"):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg, kda_impl)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # ------------------------------------------------------------------ dtype / device
    # read off the final norm: never quantized, unlike the embedding kimiq.quant may swap out
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def to_dtype(self, dtype: torch.dtype) -> "KimiLinearForCausalLM":
        """Cast floating parameters to ``dtype`` except those that stay fp32 (``keep_fp32``)."""
        for name, p in list(self.named_parameters()) + list(self.named_buffers()):
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if keep_fp32(name) else dtype)
        return self

    # ------------------------------------------------------------------ state
    def new_state(self, batch_size: int, capacity: int = 0, device: torch.device | None = None,
                  cache_dtype: torch.dtype | None = None) -> ModelState:
        """Empty state for ``batch_size`` rows; MLA caches pre-sized to ``capacity`` tokens (grow on demand), in
        ``cache_dtype`` (default: ``self.cache_dtype``, else the model dtype)."""
        cfg = self.config
        device = device or self.device
        dt = self.dtype
        cache_dt = cache_dtype or self.cache_dtype or dt
        P, H, K = cfg.kda.proj_dim, cfg.kda.num_heads, cfg.kda.head_dim
        W = cfg.kda.short_conv_kernel_size
        layers: list[KDAState | MLAState] = []
        for t in cfg.layer_types:
            if t == LAYER_KDA:
                layers.append(
                    KDAState(
                        conv_q=torch.zeros(batch_size, P, W - 1, dtype=dt, device=device),
                        conv_k=torch.zeros(batch_size, P, W - 1, dtype=dt, device=device),
                        conv_v=torch.zeros(batch_size, P, W - 1, dtype=dt, device=device),
                        recurrent=torch.zeros(batch_size, H, K, K, dtype=torch.float32, device=device),
                    )
                )
            else:
                latent = torch.zeros(batch_size, capacity, cfg.mla.latent_dim, dtype=cache_dt, device=device)
                layers.append(MLAState(latent))
        return ModelState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        state: ModelState | None = None,
        *,
        n_valid: torch.Tensor | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids: [B, T] (right-padded when rows differ); n_valid: [B] valid tokens per row.

        Returns logits [B, T, V] in fp32, or [B, 1, V] at each row's last valid token when
        ``last_only``; with ``return_hidden`` the final-norm hidden states instead of logits.
        Without ``state`` every row must be full (n_valid is rejected): use a state for ragged batches.
        """
        B, T = input_ids.shape
        valid = None
        if n_valid is not None:
            if state is None:
                raise ValueError("n_valid needs a state (ragged rows are tracked by state.lengths)")
            n_valid = n_valid.to(device=input_ids.device, dtype=torch.long)
            if bool((n_valid > T).any()) or bool((n_valid < 0).any()):
                raise ValueError(f"n_valid must be in [0, {T}]")
            if bool((n_valid < T).any()):
                valid = torch.arange(T, device=input_ids.device).view(1, T) < n_valid.view(B, 1)
        if state is not None and state.batch_size != B:
            raise ValueError(f"state has {state.batch_size} rows, input has {B}")
        lengths = state.lengths if state is not None else None

        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            s = state.layers[i] if state is not None else None
            x = layer(x, s, lengths, valid, n_valid if valid is not None else None)
        x = self.model.norm(x)
        if state is not None:
            state.lengths += n_valid if n_valid is not None else T
        if last_only:
            last = (n_valid - 1).clamp(min=0) if n_valid is not None else torch.full((B,), T - 1, device=x.device)
            x = x[torch.arange(B, device=x.device), last].unsqueeze(1)  # [B, 1, D]
        if return_hidden:
            return x
        return self.lm_head(x).float()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "KimiLinearForCausalLM":
        """Random initialisation for tests and training (fla / DeepSeek-style ranges)."""
        gen = torch.Generator().manual_seed(seed)

        def normal_(t: torch.Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=gen) * s)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":  # rate in U(1, 16), as fla
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=gen).log())
            elif leaf == "dt_bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1)
                dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "conv1d" in name:
                bound = 1 / math.sqrt(p.shape[-1])
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            elif leaf in ("w2",) or name.endswith(("o_proj.weight", "down_proj.weight")):
                normal_(p, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                normal_(p, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        return self
