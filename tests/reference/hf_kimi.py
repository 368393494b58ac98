"""Reference harness: transformers' native ``KimiLinearForCausalLM`` on small random checkpoints.

Checkpoints are written in the ORIGINAL Hugging Face (moonshotai remote-code) layout: ``config.json`` is the given
dict verbatim, tensors use the original names (``q_conv1d``/``k_conv1d``/``v_conv1d``, ``A_log``/``dt_bias`` directly
under ``self_attn``, ``block_sparse_moe.experts.{e}.w1|w2|w3``, dense layers under ``mlp.``).  We convert
transformers' internal state dict ourselves instead of using ``save_pretrained``, which (5.23) also renames every
*dense* layer's ``mlp.*`` to ``block_sparse_moe.*``.

Usage (tests import it as ``from tests.reference.hf_kimi import ...``; ``tests/`` is a package)::

    path = build_hf_checkpoint(TINY, tmp_path / "m", n_shards=3)
    ref = hf_logits(path, ids)            # [B, T, V] float32, full forward without cache
    toks = hf_greedy(path, ids[:1], 16)   # greedy continuation with the KDA/MLA cache

transformers must run without fla/triton (pure-torch fallbacks on CPU).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from kimiq.train.trainer import default_hf_config

__all__ = [
    "TINY", "TWO_MLA_TWO_DENSE", "PRESETS", "layer_schedule", "expected_names", "build_hf_model",
    "to_original_state_dict", "write_checkpoint", "build_hf_checkpoint", "load_hf_model", "hf_logits", "hf_greedy",
]  # fmt: skip

# --------------------------------------------------------------------------------------------------- presets

# peers.md §1: 4 layers (KDA, KDA, KDA, MLA); layer 0 dense, 1-3 MoE (8 experts, top-2, 1 group).
TINY: dict = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
    "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
    "kv_lora_rank": 64, "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
    "v_head_dim": 32, "mla_use_nope": True,
    "linear_attn_config": {"full_attn_layers": [4], "kda_layers": [1, 2, 3], "head_dim": 32,
                           "num_heads": 4, "short_conv_kernel_size": 4},
    "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 1,
    "moe_router_activation_func": "sigmoid", "moe_renormalize": True, "routed_scaling_factor": 2.446,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "use_grouped_topk": True,
    "num_expert_group": 1, "topk_group": 1, "hidden_act": "silu", "rope_theta": 10000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-05, "model_max_length": 4096,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "use_cache": True, "torch_dtype": "float32",
}  # fmt: skip

# 7 layers: 0 KDA+dense, 1 MLA+dense, 2-4 KDA+MoE, 5 MLA+MoE, 6 KDA+MoE.  Deliberately "odd" dims so that
# nothing can be hard-coded: hidden 96, KDA 3 heads x 32, MLA 3 heads with v_head_dim (24) != qk_nope (16),
# 2 shared experts (shared width 2*32), grouped routing 4 groups of 2 experts with topk_group 2.
TWO_MLA_TWO_DENSE: dict = {
    **TINY,
    "vocab_size": 800, "hidden_size": 96, "intermediate_size": 192, "moe_intermediate_size": 32,
    "num_hidden_layers": 7, "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 32,
    "kv_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
    "linear_attn_config": {"full_attn_layers": [2, 6], "kda_layers": [1, 3, 4, 5, 7], "head_dim": 32,
                           "num_heads": 3, "short_conv_kernel_size": 4},
    "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 2, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 2, "num_expert_group": 4, "topk_group": 2,
}  # fmt: skip

# The embedded default model's config (kimiq train --preset default), random weights, fp32.
DEFAULT_MODEL: dict = {**default_hf_config(4096), "torch_dtype": "float32"}

PRESETS = {"TINY": TINY, "TWO_MLA_TWO_DENSE": TWO_MLA_TWO_DENSE, "DEFAULT_MODEL": DEFAULT_MODEL}


# --------------------------------------------------------------------------------------------------- names
def layer_schedule(config: dict) -> list[tuple[str, str]]:
    """Per 0-indexed layer: (``"kda"|"mla"``, ``"dense"|"moe"``), by the original remote-code rules."""
    lac = config["linear_attn_config"]
    kda, full = set(lac["kda_layers"]), set(lac["full_attn_layers"])  # 1-indexed
    out = []
    for i in range(config["num_hidden_layers"]):
        assert ((i + 1) in kda) != ((i + 1) in full), f"layer {i} must be exactly one of KDA / MLA"
        moe = bool(config.get("num_experts")) and i >= config.get("first_k_dense_replace", 0)
        moe = moe and i % config.get("moe_layer_freq", 1) == 0
        out.append(("kda" if (i + 1) in kda else "mla", "moe" if moe else "dense"))
    return out


def expected_names(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an original-layout checkpoint for ``config``, with its shape."""
    c, lac = config, config["linear_attn_config"]
    D, H, K, ks = c["hidden_size"], lac["num_heads"], lac["head_dim"], lac.get("short_conv_kernel_size", 4)
    P, nh = H * K, c["num_attention_heads"]
    nope, rope, vd, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    E, mi = c.get("num_experts"), c.get("moe_intermediate_size")
    names = {"model.embed_tokens.weight": (c["vocab_size"], D), "model.norm.weight": (D,)}
    if not c.get("tie_word_embeddings", False):
        names["lm_head.weight"] = (c["vocab_size"], D)
    for i, (attn, ffn) in enumerate(layer_schedule(c)):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (D,)
        names[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if attn == "kda":
            for x in "qkv":
                names[f"{a}{x}_proj.weight"] = (P, D)
                names[f"{a}{x}_conv1d.weight"] = (P, 1, ks)
            names |= {a + "A_log": (1, 1, H, 1), a + "dt_bias": (P,), a + "f_a_proj.weight": (K, D),
                      a + "f_b_proj.weight": (P, K), a + "b_proj.weight": (H, D), a + "g_a_proj.weight": (K, D),
                      a + "g_b_proj.weight": (P, K), a + "o_norm.weight": (K,),
                      a + "o_proj.weight": (D, P)}  # fmt: skip
        else:
            if c.get("q_lora_rank") is None:
                names[a + "q_proj.weight"] = (nh * (nope + rope), D)
            else:
                q = c["q_lora_rank"]
                names |= {a + "q_a_proj.weight": (q, D), a + "q_a_layernorm.weight": (q,),
                          a + "q_b_proj.weight": (nh * (nope + rope), q)}  # fmt: skip
            names |= {a + "kv_a_proj_with_mqa.weight": (r + rope, D), a + "kv_a_layernorm.weight": (r,),
                      a + "kv_b_proj.weight": (nh * (nope + vd), r), a + "o_proj.weight": (D, nh * vd)}  # fmt: skip
        if ffn == "dense":
            I = c["intermediate_size"]
            names |= {p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                      p + "mlp.down_proj.weight": (D, I)}  # fmt: skip
        else:
            m = p + "block_sparse_moe."
            names[m + "gate.weight"] = (E, D)
            names[m + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                names |= {f"{m}experts.{e}.w1.weight": (mi, D), f"{m}experts.{e}.w2.weight": (D, mi),
                          f"{m}experts.{e}.w3.weight": (mi, D)}  # fmt: skip
            si = mi * c.get("num_shared_experts", 1)
            if si:
                s = m + "shared_experts."
                names |= {s + "gate_proj.weight": (si, D), s + "up_proj.weight": (si, D),
                          s + "down_proj.weight": (D, si)}  # fmt: skip
    return names


# --------------------------------------------------------------------------------------------------- build
def _hf():
    from transformers.models.kimi_linear import modeling_kimi_linear as mk
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig

    return KimiLinearConfig, mk


@torch.no_grad()
def build_hf_model(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Seeded random ``KimiLinearForCausalLM`` (fp32, eval) in which every weight matters.

    Perturbs what transformers initialises to constants or to tiny values: all RMSNorm weights (incl. ``o_norm``,
    ``kv_a_layernorm``) += 0.1*randn; ``e_score_correction_bias`` = 0.05*randn; ``A_log`` = log U(1, 16);
    ``dt_bias`` = inverse softplus of dt ~ logU(1e-3, 1e-1) plus 0.5*randn; conv weights = 0.3*randn; the low-rank
    gate up-projections ``f_b_proj``/``g_b_proj`` x5 (std 0.1) so forget and output gates vary visibly; MLA latent
    rows of ``kv_a_proj_with_mqa`` x0.25 so a wrong ``kv_a_layernorm`` eps (1e-5 instead of 1e-6) exceeds 1e-4 in
    the logits.  Every parameter is rounded through ``dtype``, so the fp32 model equals a checkpoint written in
    ``dtype``.  Attention runs eager (as in ``load_hf_model``), so in-memory and reloaded logits are bitwise equal.
    """
    KimiLinearConfig, mk = _hf()
    sched = layer_schedule(config)
    if any(ffn == "moe" for _, ffn in sched) and config.get("moe_layer_freq", 1) != 1:
        raise ValueError("transformers ignores moe_layer_freq; only moe_layer_freq=1 is comparable")
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the original config's `rope_scaling: null` triggers a FutureWarning
        warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
        hf_cfg = KimiLinearConfig(**config)
    model = mk.KimiLinearForCausalLM(hf_cfg)
    assert [t for t in hf_cfg.layer_types] == [
        "linear_attention" if a == "kda" else "full_attention" for a, _ in sched
    ] and list(hf_cfg.mlp_layer_types) == ["sparse" if f == "moe" else "dense" for _, f in sched]
    for mod in model.modules():
        if isinstance(mod, (mk.KimiLinearRMSNorm, mk.KimiLinearRMSNormGated)):
            mod.weight.add_(0.1 * torch.randn_like(mod.weight))
        elif isinstance(mod, mk.KimiLinearTopkRouter):
            mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
        elif isinstance(mod, mk.KimiLinearForgetGate):
            mod.A_log.copy_(torch.empty_like(mod.A_log).uniform_(1.0, 16.0).log())
            dt = torch.empty_like(mod.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            mod.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)) + 0.5 * torch.randn_like(dt))
            mod.f_b_proj.weight.mul_(5.0)
        elif isinstance(mod, mk.KimiLinearDeltaAttention):
            mod.conv1d.weight.copy_(0.3 * torch.randn_like(mod.conv1d.weight))
            mod.g_b_proj.weight.mul_(5.0)
        elif isinstance(mod, mk.KimiLinearAttention):  # smaller latent => kv_a_layernorm's eps (1e-6) is visible
            mod.kv_a_proj_with_mqa.weight[: mod.kv_lora_rank].mul_(0.25)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(dtype).to(torch.float32))
    model.set_attn_implementation("eager")
    return model.float().eval()


def to_original_state_dict(model, config: dict) -> dict[str, torch.Tensor]:
    """transformers' internal tensors -> original checkpoint names (the inverse of conversion_mapping)."""
    sched = layer_schedule(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            name = name.replace(".self_attn.forget_gate.", ".self_attn.")
            if name.endswith(".self_attn.conv1d.weight"):
                for x, w in zip("qkv", t.chunk(3, dim=0)):
                    out[name.replace(".conv1d.", f".{x}_conv1d.")] = w
                continue
            if sched[i][1] == "moe":
                name = name.replace(".mlp.", ".block_sparse_moe.")
                if name.endswith(".experts.gate_up_proj"):  # [E, 2I, D] = [w1 (gate); w3 (up)] along dim 1
                    w1, w3 = t.chunk(2, dim=1)
                    for e in range(t.shape[0]):
                        out[name.replace("gate_up_proj", f"{e}.w1.weight")] = w1[e]
                        out[name.replace("gate_up_proj", f"{e}.w3.weight")] = w3[e]
                    continue
                if name.endswith(".experts.down_proj"):  # [E, D, I]
                    for e in range(t.shape[0]):
                        out[name.replace("down_proj", f"{e}.w2.weight")] = t[e]
                    continue
        out[name] = t
    return out


def write_checkpoint(
    tensors: dict[str, torch.Tensor], config: dict, out_dir, *, n_shards: int = 1, dtype=torch.float32
) -> Path:
    """Write ``config.json`` (verbatim) and safetensors shards (+ index when ``n_shards > 1``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.to(dtype).contiguous().clone() for k, v in tensors.items()}
    if n_shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    assert n_shards <= len(tensors)
    names = list(tensors)  # layer order; split into contiguous runs of about equal bytes
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in names]
    total, groups, acc = sum(sizes), [[] for _ in range(n_shards)], 0
    for k, s in zip(names, sizes):
        groups[min(n_shards - 1, acc * n_shards // total)].append(k)
        acc += s
    for g in range(n_shards):  # guarantee no empty shard
        if not groups[g]:
            donor = max(range(n_shards), key=lambda j: len(groups[j]))
            groups[g].append(groups[donor].pop())
    weight_map = {}
    for g, keys in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in keys}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def build_hf_checkpoint(config: dict, out_dir, *, seed: int = 0, n_shards: int = 1, dtype=torch.float32) -> Path:
    """Build the seeded random model (``build_hf_model``) and write it in the original layout; returns the dir."""
    model = build_hf_model(config, seed=seed, dtype=dtype)
    tensors = to_original_state_dict(model, config)
    exp = expected_names(config)
    assert set(tensors) == set(exp), (sorted(set(tensors) - set(exp)), sorted(set(exp) - set(tensors)))
    bad = {k: (tuple(v.shape), exp[k]) for k, v in tensors.items() if tuple(v.shape) != exp[k]}
    assert not bad, bad
    return write_checkpoint(tensors, config, out_dir, n_shards=n_shards, dtype=dtype)


# --------------------------------------------------------------------------------------------------- run
def load_hf_model(model_dir, *, strict: bool = True):
    """``from_pretrained`` in fp32 eval with eager attention; with ``strict``, no missing/unexpected keys."""
    _, mk = _hf()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
        model, info = mk.KimiLinearForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    if strict:
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading {model_dir}: {bad}"
    return model.float().eval()


@torch.no_grad()
def hf_logits(model_dir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, model=None):
    """Full forward without cache; returns float32 logits [B, T, V].  Pass ``model`` to skip loading."""
    model = model if model is not None else load_hf_model(model_dir)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.float()


@torch.no_grad()
def hf_greedy(model_dir, input_ids: torch.Tensor, n_new: int, *, model=None) -> list[int]:
    """Greedy decoding with transformers' cache (prefill, then one token per step); exactly ``n_new`` tokens
    (EOS does not stop it).  Equals ``model.generate(do_sample=False)`` up to the EOS stop."""
    from transformers.cache_utils import DynamicCache

    model = model if model is not None else load_hf_model(model_dir)
    assert input_ids.ndim == 2 and input_ids.shape[0] == 1
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    toks: list[int] = []
    while True:
        toks.append(int(out.logits[0, -1].argmax()))
        if len(toks) >= n_new:
            return toks[:n_new]
        out = model(input_ids=torch.tensor([toks[-1:]]), past_key_values=out.past_key_values, use_cache=True)
