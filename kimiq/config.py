"""Model configuration: the real Kimi-Linear ``config.json`` read into frozen dataclasses.

``ModelConfig.from_hf(d)`` accepts exactly the keys of the Hugging Face checkpoint
(``../shared/reference/kimi-linear-architecture.md`` §1).  Unknown keys are an error unless
they are on ``IGNORED_KEYS`` (keys that exist in real configs but carry nothing kimiq uses),
so a misspelt key never silently changes the model.  The 1-indexed
``linear_attn_config.kda_layers`` / ``full_attn_layers`` become one 0-indexed tuple
``layer_types`` of ``"kda"`` / ``"mla"``.

Numerical choices that differ between reference implementations live here as explicit
fields with the transformers-native value as default (see ``kimiq/model/*.py`` for where
each is used):

* ``kv_a_layernorm_eps = 1e-6``: HF remote code and transformers-native build
  ``kv_a_layernorm`` with the RMSNorm default eps, not ``rms_norm_eps`` (vLLM, mlx-lm and
  llama.cpp use 1e-5).
* ``kda_l2norm_eps = 1e-6``: fla / transformers; llama.cpp uses ``rms_norm_eps`` (1e-5).
* ``router_bias_in_weights = False``: vLLM / transformers-native mix the experts with the
  unbiased sigmoid scores; HF remote code leaks ``e_score_correction_bias`` into them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["KIMI_LINEAR_48B_HF", "ConfigError", "KDAConfig", "MLAConfig", "MoEConfig", "ModelConfig", "IGNORED_KEYS"]


class ConfigError(ValueError):
    """A config.json that kimiq cannot run faithfully."""


# Keys present in real Kimi-Linear configs that kimiq does not need.  Anything else unknown
# raises, so typos fail loudly (unlike mlx-lm's ``from_dict``).
IGNORED_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "transformers_version",
        "initializer_range",
        "use_cache",
        "rope_theta",  # unused: Kimi-Linear MLA is NoPE
        "rope_scaling",
        "head_dim",  # legacy (hidden/heads); KDA and MLA use their own dims
        "torch_dtype",
        "dtype",
        "attention_dropout",
        "attention_bias",
        "quantization_config",  # read by kimiq.quant, not by the model shape
        "num_nextn_predict_layers",
        "_name_or_path",
        "kimiq",  # kimiq's own metadata block (training provenance etc.)
    }
)

LAYER_KDA = "kda"
LAYER_MLA = "mla"


@dataclass(frozen=True)
class KDAConfig:
    """Kimi Delta Attention: H heads of K = V = head_dim, causal depthwise short conv."""

    num_heads: int
    head_dim: int
    short_conv_kernel_size: int = 4

    @property
    def proj_dim(self) -> int:  # width of q/k/v/gate projections
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention without RoPE and without q-LoRA."""

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:  # cached values per token: normalised c + shared rope-key slice
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """Sigmoid-routed mixture of experts with correction bias and shared experts."""

    num_experts: int
    num_experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int = 1
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    kda: KDAConfig
    mla: MLAConfig
    moe: MoEConfig | None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_max_length: int = 1048576
    dtype: str = "bfloat16"
    # Choices where references disagree (module docstring).
    kv_a_layernorm_eps: float = 1e-6
    kda_l2norm_eps: float = 1e-6
    router_bias_in_weights: bool = False
    # The raw dict this was read from, for writing back unchanged (not compared).
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer schedule has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = [t for t in self.layer_types if t not in (LAYER_KDA, LAYER_MLA)]
        if bad:
            raise ConfigError(f"unknown layer types {bad}")

    # ------------------------------------------------------------------ schedule
    def is_moe(self, layer: int) -> bool:
        m = self.moe
        return m is not None and layer >= m.first_k_dense_replace and layer % m.moe_layer_freq == 0

    @property
    def kda_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LAYER_KDA)

    @property
    def mla_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LAYER_MLA)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Read a Hugging Face Kimi-Linear ``config.json`` dict."""
        known = {
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_use_nope",
            "linear_attn_config", "num_experts", "num_experts_per_token", "num_shared_experts",
            "moe_router_activation_func", "moe_renormalize", "routed_scaling_factor",
            "use_grouped_topk", "num_expert_group", "topk_group", "first_k_dense_replace",
            "moe_layer_freq", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "model_max_length",
        }  # fmt: skip
        unknown = sorted(set(d) - known - IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown config.json key(s) {unknown}; kimiq reads the Kimi-Linear config "
                f"(add deliberate extras to kimiq.config.IGNORED_KEYS)"
            )
        if d.get("model_type", "kimi_linear") != "kimi_linear":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not 'kimi_linear'")
        if d.get("q_lora_rank") is not None:
            raise ConfigError("q_lora_rank is set: Kimi-Linear MLA has no q-LoRA (q_lora_rank must be null)")
        if not d.get("mla_use_nope", True):
            raise ConfigError("mla_use_nope=false (RoPE in MLA) is not Kimi-Linear and is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (Kimi-Linear uses 'silu')")
        if d.get("moe_router_activation_func", "sigmoid") != "sigmoid":
            raise ConfigError("only the sigmoid MoE router is supported")
        n_heads = _req(d, "num_attention_heads")
        if d.get("num_key_value_heads", n_heads) != n_heads:
            raise ConfigError(
                f"num_key_value_heads={d['num_key_value_heads']} != num_attention_heads={n_heads}: "
                "Kimi-Linear MLA is MHA after decompression (1 is llama.cpp's MQA rewrite, not an HF config)"
            )

        lac = dict(_req(d, "linear_attn_config"))
        lac_known = {"kda_layers", "full_attn_layers", "num_heads", "head_dim", "short_conv_kernel_size"}
        lac_unknown = sorted(set(lac) - lac_known)
        if lac_unknown:
            raise ConfigError(f"unknown linear_attn_config key(s) {lac_unknown}")
        n_layers = _req(d, "num_hidden_layers")
        layer_types = _layer_types(n_layers, lac.get("kda_layers", []), lac.get("full_attn_layers", []))

        moe = None
        if d.get("num_experts"):
            moe = MoEConfig(
                num_experts=d["num_experts"],
                num_experts_per_token=_req(d, "num_experts_per_token"),
                moe_intermediate_size=_req(d, "moe_intermediate_size"),
                num_shared_experts=d.get("num_shared_experts", 1) or 0,
                renormalize=d.get("moe_renormalize", True),
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                use_grouped_topk=d.get("use_grouped_topk", True),
                num_expert_group=d.get("num_expert_group", 1) or 1,
                topk_group=d.get("topk_group", 1) or 1,
                first_k_dense_replace=d.get("first_k_dense_replace", 0),
                moe_layer_freq=d.get("moe_layer_freq", 1),
            )
            if moe.num_experts % moe.num_expert_group:
                raise ConfigError("num_experts must be divisible by num_expert_group")

        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        cfg = cls(
            vocab_size=_req(d, "vocab_size"),
            hidden_size=_req(d, "hidden_size"),
            intermediate_size=_req(d, "intermediate_size"),
            num_hidden_layers=n_layers,
            layer_types=layer_types,
            kda=KDAConfig(
                num_heads=_req(lac, "num_heads"),
                head_dim=_req(lac, "head_dim"),
                short_conv_kernel_size=lac.get("short_conv_kernel_size", 4),
            ),
            mla=MLAConfig(
                num_heads=n_heads,
                kv_lora_rank=_req(d, "kv_lora_rank"),
                qk_nope_head_dim=_req(d, "qk_nope_head_dim"),
                qk_rope_head_dim=_req(d, "qk_rope_head_dim"),
                v_head_dim=_req(d, "v_head_dim"),
            ),
            moe=moe,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            model_max_length=d.get("model_max_length", 1048576),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
            raw=dict(d),
        )
        return replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_hf(d, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The config in Hugging Face checkpoint form (1-indexed layer lists)."""
        d: dict[str, Any] = {
            "architectures": ["KimiLinearForCausalLM"],
            "model_type": "kimi_linear",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.mla.num_heads,
            "num_key_value_heads": self.mla.num_heads,
            "head_dim": self.hidden_size // self.mla.num_heads,
            "q_lora_rank": None,
            "kv_lora_rank": self.mla.kv_lora_rank,
            "qk_nope_head_dim": self.mla.qk_nope_head_dim,
            "qk_rope_head_dim": self.mla.qk_rope_head_dim,
            "v_head_dim": self.mla.v_head_dim,
            "mla_use_nope": True,
            "linear_attn_config": {
                "kda_layers": [i + 1 for i in self.kda_layers],
                "full_attn_layers": [i + 1 for i in self.mla_layers],
                "num_heads": self.kda.num_heads,
                "head_dim": self.kda.head_dim,
                "short_conv_kernel_size": self.kda.short_conv_kernel_size,
            },
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "model_max_length": self.model_max_length,
            "dtype": self.dtype,
            "use_cache": True,
        }
        if self.moe is not None:
            m = self.moe
            d.update(
                num_experts=m.num_experts,
                num_experts_per_token=m.num_experts_per_token,
                num_shared_experts=m.num_shared_experts,
                moe_intermediate_size=m.moe_intermediate_size,
                moe_router_activation_func="sigmoid",
                moe_renormalize=m.renormalize,
                routed_scaling_factor=m.routed_scaling_factor,
                use_grouped_topk=m.use_grouped_topk,
                num_expert_group=m.num_expert_group,
                topk_group=m.topk_group,
                first_k_dense_replace=m.first_k_dense_replace,
                moe_layer_freq=m.moe_layer_freq,
            )
        for k in ("kimiq", "quantization_config"):
            if k in self.raw:
                d[k] = self.raw[k]
        return d

    @classmethod
    def tiny(cls, **hf_overrides: Any) -> "ModelConfig":
        """The 4-layer test model of ``peers.md`` §1 (hidden 128, vocab 1000), fp32."""
        d = dict(TINY_HF)
        d.update(hf_overrides)
        return cls.from_hf(d)


def _req(d: dict, key: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json is missing required key {key!r}")
    return d[key]


def _layer_types(n_layers: int, kda_1idx: list[int], full_1idx: list[int]) -> tuple[str, ...]:
    """1-indexed layer lists -> 0-indexed tuple of layer types; every layer exactly once."""
    kda, full = set(kda_1idx), set(full_1idx)
    if kda & full:
        raise ConfigError(f"layers {sorted(kda & full)} are listed as both KDA and full attention")
    if len(kda) != len(kda_1idx) or len(full) != len(full_1idx):
        raise ConfigError("duplicate entries in linear_attn_config layer lists")
    out = []
    for i in range(n_layers):
        if i + 1 in kda:
            out.append(LAYER_KDA)
        elif i + 1 in full:
            out.append(LAYER_MLA)
        else:
            raise ConfigError(
                f"layer {i} (1-indexed {i + 1}) is in neither linear_attn_config.kda_layers nor full_attn_layers"
            )
    extra = sorted((kda | full) - set(range(1, n_layers + 1)))
    if extra:
        raise ConfigError(f"linear_attn_config lists layers {extra} beyond num_hidden_layers={n_layers} (1-indexed)")
    return tuple(out)


# peers.md §1: the tiny random test model in original HF layout.
TINY_HF: dict[str, Any] = {
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

# moonshotai/Kimi-Linear-48B-A3B-Instruct config.json, architecture fields (kimi-linear-architecture.md §1):
# the memory planner and the recipe size checks use it; nothing downloads it.
KIMI_LINEAR_48B_HF: dict[str, Any] = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
    "vocab_size": 163840, "hidden_size": 2304, "head_dim": 72, "hidden_act": "silu", "intermediate_size": 9216,
    "moe_intermediate_size": 1024, "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "mla_use_nope": True, "rope_theta": 10000.0, "rope_scaling": None, "model_max_length": 1048576,
    "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
                           "full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "num_heads": 32, "head_dim": 128,
                           "short_conv_kernel_size": 4},
    "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1, "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True, "routed_scaling_factor": 2.446, "use_grouped_topk": True, "num_expert_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163586,
    "pad_token_id": 163839, "initializer_range": 0.02, "use_cache": True,
}  # fmt: skip
