"""``kimiq export --gguf``: a kimiq checkpoint -> one GGUF file for llama.cpp (arch ``kimi-linear``).

Follows ``docs/dev/gguf-kimi-linear.md`` (what llama.cpp's own converter writes and its loader checks,
llama-cpp-python 0.3.36): the ``kimi-linear.*`` hyper-parameters, the tokenizer as a GPT-2-style BPE
(tokens in byte-to-unicode form, merges rebuilt from the tiktoken ranks, pre-tokenizer ``kimi-k2``),
and the tensors renamed and reshaped (``A_log`` -> ``ssm_a = -exp(A_log)``, convs as ``[W,1,P,1]``,
``kv_b_proj`` split per head into ``attn_k_b`` / ``attn_v_b``, routed experts stacked).

Tensor types: ``outtype`` ``f32`` / ``f16`` / ``bf16``, or a recipe (``q8_0``, ``q4_k_m`` ...) whose
formats are quantized with kimiq's llama.cpp-exact quantizers; a kimiq-quantized checkpoint keeps
its stored GGUF blocks as they are (``outtype="auto"``, the default for one).  Tensors llama.cpp wants
in F32 (norms, the router, convs, ``ssm_a``, biases) are always F32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kimiq.config import LAYER_MLA, ModelConfig
from kimiq.model.mla import split_kv_b
from kimiq.model.weights import checkpoint_inventory, load_model, quantization_config
from kimiq.quant.formats import get_format
from kimiq.quant.modules import checkpoint_tensor
from kimiq.quant.recipes import KEEP, fit_format, get_recipe, tensor_role
from kimiq.tokenizer import Tokenizer, load_tiktoken_model

from .vocab import bpe_merges, byte_to_unicode

__all__ = ["export_gguf", "gguf_tensors"]

ARCH = "kimi-linear"


def _ggml_type(fmt: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q5_0": T.Q5_0,
            "q5_1": T.Q5_1, "mxfp4": T.MXFP4, "q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K,
            "q6_k": T.Q6_K}[fmt]  # fmt: skip


def _encode(fmt: str, w: torch.Tensor) -> np.ndarray:
    """A float tensor [..., K] -> the array GGUFWriter stores: float data, or block bytes [..., K/blk*bytes]."""
    if fmt == "f32":
        return w.to(torch.float32).numpy()
    if fmt == "f16":
        return w.to(torch.float16).numpy()
    if fmt == "bf16":  # raw bytes + raw_dtype=BF16 (GGUFWriter derives the shape from the byte shape)
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    lead, K = tuple(w.shape[:-1]), w.shape[-1]
    packed = get_format(fmt).quantize(w.reshape(-1, K).to(torch.float32))["weight"].numpy()
    return packed.reshape(*lead, packed.shape[-1])


class _Src:
    """Float tensors (dequantized where quantized) and stored GGUF blocks of a kimiq checkpoint."""

    def __init__(self, root: Path):
        self.model = load_model(root, dtype=torch.float32)
        self.formats: dict[str, str] = (quantization_config(root) or {}).get("formats", {})

    def float(self, name: str) -> torch.Tensor:
        """A checkpoint tensor (HF name) as float32 (dequantized if stored quantized)."""
        return checkpoint_tensor(self.model, name)

    def blocks(self, name: str) -> torch.Tensor | None:
        """Stored GGUF block bytes [out, bytes] of a quantized tensor, else None."""
        fmt = self.formats.get(name)
        if fmt is None or get_format(fmt).family != "gguf":
            return None
        if ".experts." in name:
            base, e, proj, _ = name.rsplit(".", 3)
            return self.model.get_submodule(base)._parts(proj)["weight"][int(e)]
        return self.model.get_submodule(name.rpartition(".")[0])._parts("q")["weight"]


_F32_ALWAYS = ("norm", "router", "router_bias", "conv", "decay")


def gguf_tensors(cfg: ModelConfig, src: _Src, choose: Callable[[str, tuple[int, ...]], str]) -> Iterator[tuple]:
    """(gguf name, array, ggml type name) in llama.cpp's order; ``choose(hf_name, row shape)`` -> format."""
    def tensor(gname: str, hf: str, w: torch.Tensor | None = None, rows_shape=None):
        role = tensor_role(hf)
        if w is None and role not in _F32_ALWAYS and len(cfg_shape(hf)) == 2:
            stored = src.blocks(hf)
            fmt = choose(hf, cfg_shape(hf))
            if stored is not None and fmt == src.formats.get(hf):
                return gname, stored.numpy(), fmt
        w = src.float(hf) if w is None else w
        if role in _F32_ALWAYS or w.dim() < 2:
            return gname, w.to(torch.float32).numpy(), "f32"
        fmt = fit_format(choose(hf, tuple(w.shape[-2:])), (1, w.shape[-1]))
        fmt = "f16" if fmt == KEEP else fmt
        return gname, _encode(fmt, w), fmt

    inv = checkpoint_inventory(cfg)

    def cfg_shape(hf):
        return tuple(inv[hf])

    yield tensor("token_embd.weight", "model.embed_tokens.weight")
    yield tensor("output_norm.weight", "model.norm.weight")
    yield tensor("output.weight", "lm_head.weight" if not cfg.tie_word_embeddings else "model.embed_tokens.weight")
    for i, kind in enumerate(cfg.layer_types):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        yield tensor(b + "attn_norm.weight", p + "input_layernorm.weight")
        yield tensor(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        if kind == LAYER_MLA:
            m = cfg.mla
            yield tensor(b + "attn_q.weight", a + "q_proj.weight")
            yield tensor(b + "attn_kv_a_mqa.weight", a + "kv_a_proj_with_mqa.weight")
            yield tensor(b + "attn_kv_a_norm.weight", a + "kv_a_layernorm.weight")
            w_uk, w_uv = split_kv_b(src.float(a + "kv_b_proj.weight"), m.num_heads, m.qk_nope_head_dim, m.v_head_dim)
            k_b = w_uk.transpose(1, 2).contiguous()  # [H, R, N] -> ne [N, R, H]
            v_b = w_uv.contiguous()  # [H, Vh, R] -> ne [R, Vh, H]
            yield tensor(b + "attn_k_b.weight", a + "kv_b_proj.weight", k_b)
            yield tensor(b + "attn_v_b.weight", a + "kv_b_proj.weight", v_b)
            yield tensor(b + "attn_output.weight", a + "o_proj.weight")
        else:
            for x in "qkv":
                yield tensor(f"{b}attn_{x}.weight", f"{a}{x}_proj.weight")
            for x in "qkv":
                w = src.float(f"{a}{x}_conv1d.weight")  # [P, 1, W]
                yield tensor(f"{b}ssm_conv1d_{x}.weight", f"{a}{x}_conv1d.weight", w.reshape(1, w.shape[0], 1, -1))
            A = src.float(a + "A_log")  # [1, 1, H, 1]
            yield f"{b}ssm_a", (-A.exp()).reshape(1, 1, A.shape[2], 1).numpy(), "f32"  # ne [1, H, 1, 1]
            yield f"{b}ssm_dt.bias", src.float(a + "dt_bias").numpy(), "f32"
            yield tensor(b + "ssm_f_a.weight", a + "f_a_proj.weight")
            yield tensor(b + "ssm_f_b.weight", a + "f_b_proj.weight")
            yield tensor(b + "ssm_beta.weight", a + "b_proj.weight")
            yield tensor(b + "ssm_g_a.weight", a + "g_a_proj.weight")
            yield tensor(b + "ssm_g_b.weight", a + "g_b_proj.weight")
            yield tensor(b + "ssm_norm.weight", a + "o_norm.weight")
            yield tensor(b + "attn_output.weight", a + "o_proj.weight")
        if cfg.is_moe(i):
            e = p + "block_sparse_moe."
            yield tensor(b + "ffn_gate_inp.weight", e + "gate.weight")
            yield f"{b}exp_probs_b.bias", src.float(e + "gate.e_score_correction_bias").numpy(), "f32"
            for proj, gname in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
                names = [f"{e}experts.{k}.{proj}.weight" for k in range(cfg.moe.num_experts)]
                fmt = choose(names[0], cfg_shape(names[0]))
                stored = [src.blocks(n) for n in names]
                if all(s is not None for s in stored) and fmt == src.formats.get(names[0]):
                    yield f"{b}{gname}.weight", torch.stack(stored).numpy(), fmt  # (E, rows, bytes)
                else:
                    yield tensor(f"{b}{gname}.weight", names[0], torch.stack([src.float(n) for n in names]))
            for x, g in (("gate_proj", "ffn_gate_shexp"), ("down_proj", "ffn_down_shexp"), ("up_proj", "ffn_up_shexp")):
                yield tensor(f"{b}{g}.weight", f"{e}shared_experts.{x}.weight")
        else:
            for x, g in (("gate_proj", "ffn_gate"), ("down_proj", "ffn_down"), ("up_proj", "ffn_up")):
                yield tensor(f"{b}{g}.weight", f"{p}mlp.{x}.weight")


def _write_metadata(w, cfg: ModelConfig, tok: Tokenizer, ranks: dict[bytes, int], name: str, file_type: int) -> None:
    import gguf

    m, k, moe = cfg.mla, cfg.kda, cfg.moe
    if k.num_heads != m.num_heads:
        raise ValueError(f"llama.cpp's kimi-linear needs KDA heads == MLA heads ({k.num_heads} != {m.num_heads})")
    if moe is None or moe.num_shared_experts < 1:
        raise ValueError("llama.cpp's kimi-linear needs MoE layers with at least one shared expert")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.model_max_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(m.num_heads)
    w.add_head_count_kv([1 if t == LAYER_MLA else 0 for t in cfg.layer_types])  # the layer schedule
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(moe.num_experts)
    w.add_expert_used_count(moe.num_experts_per_token)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(m.kv_lora_rank + m.qk_rope_head_dim)
    w.add_value_length(m.kv_lora_rank)
    w.add_vocab_size(cfg.vocab_size)
    w.add_uint32(f"{ARCH}.ssm.conv_kernel", k.short_conv_kernel_size)
    w.add_uint32(f"{ARCH}.kda.head_dim", k.head_dim)
    w.add_kv_lora_rank(m.kv_lora_rank)
    w.add_rope_dimension_count(m.qk_rope_head_dim)
    w.add_uint32(f"{ARCH}.attention.key_length_mla", m.qk_nope_head_dim + m.qk_rope_head_dim)
    w.add_uint32(f"{ARCH}.attention.value_length_mla", m.v_head_dim)
    w.add_expert_feed_forward_length(moe.moe_intermediate_size)
    w.add_expert_shared_count(moe.num_shared_experts)
    if moe.moe_layer_freq != 1:
        raise ValueError("llama.cpp's kimi-linear needs moe_layer_freq == 1")
    w.add_leading_dense_block_count(moe.first_k_dense_replace)
    w.add_expert_weights_scale(moe.routed_scaling_factor)
    # tokenizer: GPT-2 style BPE with Kimi's pre-tokenizer
    enc = byte_to_unicode()
    tokens, types = [], []
    for i in range(tok.vocab_size):
        if i < tok.n_base:
            tokens.append("".join(enc[c] for c in tok.token_bytes(i)))
            types.append(1)  # NORMAL
        else:
            tokens.append(tok.id_to_token(i))
            types.append(3)  # CONTROL
    if len(set(tokens)) != len(tokens):
        raise ValueError("token strings collide in GGUF form (llama.cpp would abort)")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(bpe_merges(ranks))
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if tok.im_end_id is not None:
        w.add_eot_token_id(tok.im_end_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)


def export_gguf(src: str | Path, out: str | Path, *, outtype: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write ``out`` (a .gguf file, atomically) from the kimiq checkpoint ``src``; see the module docstring."""
    import gguf

    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_file(src)
    s = _Src(src)
    if outtype == "auto":
        outtype = "stored" if s.formats else "f32"
    if outtype in ("f32", "f16", "bf16"):
        def choose(hf, shape):  # noqa: E306
            return outtype
        file_type = {"f32": 0, "f16": 1, "bf16": 32}[outtype]
    elif outtype == "stored":
        def choose(hf, shape):  # noqa: E306
            fmt = s.formats.get(hf, "f16")
            return fmt if get_format(fmt).family in ("gguf", "float") else "f16"
        file_type = 1
    else:
        plan = get_recipe(outtype).plan(cfg)
        bad = {f for f in plan.values() if f != KEEP and get_format(f).family != "gguf"}
        if bad:
            raise ValueError(f"recipe {outtype!r} uses non-GGUF formats {sorted(bad)}; GGUF needs GGUF types")

        def choose(hf, shape):  # noqa: E306
            return plan.get(hf, KEEP)
        file_type = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q3_k_s": 11, "q2_k": 10, "mxfp4_moe": 38}.get(outtype, 1)
    tok = Tokenizer.from_dir(src)
    ranks = load_tiktoken_model(src / "tiktoken.model")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        _write_metadata(writer, cfg, tok, ranks, json.loads((src / "config.json").read_text()).get("_name_or_path",
                        src.name), file_type)
        n = 0
        for gname, arr, fmt in gguf_tensors(cfg, s, choose):
            t = _ggml_type(fmt)
            if fmt in ("f32", "f16"):
                writer.add_tensor(gname, np.ascontiguousarray(arr))
            else:
                writer.add_tensor(gname, np.ascontiguousarray(arr), raw_dtype=t)
            n += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log(f"wrote {out}: {n} tensors, {out.stat().st_size / 1e6:.1f} MB, types from {outtype}")
    return out
