"""``kimiq export --mlx``: a kimiq checkpoint -> a directory ``mlx_lm.load`` runs (Kimi-Linear, float or quantized).

Follows ``docs/dev/mlx-kimi-linear.md`` (mlx-lm 0.32.2): tensors are written under mlx-lm's own names
(the ones its ``sanitize`` produces, which it leaves alone): routed experts stacked into
``mlp.switch_mlp.{gate,up,down}_proj``, ``block_sparse_moe.`` -> ``mlp.``, convs as ``x_conv.conv.weight``
``[P, W, 1]``, ``kv_b_proj`` split into ``embed_q`` ``[H, R, N]`` and ``unembed_out`` ``[H, Vh, R]``.
Quantized modules get ``.weight`` (uint32 codes), ``.scales`` and, for affine, ``.biases``; config.json
gains mlx-lm's ``quantization`` block (and the same as ``quantization_config``).  A ``tokenizer.json`` with
Kimi's split pattern is written so transformers needs neither remote code nor ``tiktoken``.

Quantization: ``recipe`` (mlx formats only: ``mxfp4-g32``, ``affine4-g64``, ``mixed-3.6`` or a JSON file)
quantizes with kimiq's mlx-exact quantizers; ``embed_q`` / ``unembed_out`` take ``kv_b_proj``'s format, or
stay float where their width does not fit the group (as mlx-lm's convert does).  Without a recipe a
float checkpoint is written in ``dtype``; a checkpoint kimiq quantized with mlx formats keeps its stored
parts (``kv_b_proj`` is split from its dequantized values and written in ``dtype``, never re-rounded).
The router is written in ``dtype`` too (bf16 by default, as mlx-lm converts it: an fp32 router would
turn mlx's activations fp32 from the first MoE layer on).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from kimiq.config import LAYER_MLA, ModelConfig
from kimiq.model.mla import split_kv_b
from kimiq.model.weights import SUMS_FILE, _sha256, _write_small, checkpoint_inventory, load_model, quantization_config
from kimiq.quant.formats import get_format
from kimiq.quant.modules import checkpoint_tensor
from kimiq.quant.recipes import KEEP, fit_format, get_recipe
from kimiq.tokenizer import Tokenizer, load_tiktoken_model

from .vocab import hf_tokenizer_json

__all__ = ["export_mlx"]

_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _mlx_entry(fmt: str) -> dict:
    f = get_format(fmt)
    if fmt == "mxfp4-mlx":
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    bits, group = int(fmt[len("affine"):].split("-g")[0]), f.block
    return {"group_size": group, "bits": bits, "mode": "affine"}


def _quantize_stack(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """[..., out, in] -> mlx parts with the leading dims kept; codes as uint32 (mlx checks the dtype)."""
    lead, K = tuple(w.shape[:-1]), w.shape[-1]
    parts = get_format(fmt).quantize(w.reshape(-1, K))
    out = {k: v.reshape(*lead, v.shape[-1]) for k, v in parts.items()}
    out["weight"] = out["weight"].view(torch.uint32)
    return out


def export_mlx(src: str | Path, out: str | Path, *, recipe: str | None = None, dtype: str = "bf16",
               overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the mlx-lm directory ``out`` from the kimiq checkpoint ``src`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    fdt = _DTYPES[dtype]
    cfg = ModelConfig.from_file(src)
    if cfg.mla is None or LAYER_MLA not in cfg.layer_types:
        raise ValueError("mlx-lm's kimi_linear needs at least one MLA layer")
    stored = (quantization_config(src) or {}).get("formats", {})
    if recipe is not None and stored:
        raise ValueError(f"{src} is already quantized; export it as it is, or quantize the full-precision checkpoint")
    bad = {f for f in stored.values() if get_format(f).family == "gguf"}
    if bad:
        raise ValueError(f"{src} holds GGUF formats {sorted(bad)}, which mlx cannot run; export it with --gguf")
    plan = get_recipe(recipe).plan(cfg) if recipe else {}
    bad = {f for f in plan.values() if f != KEEP and get_format(f).family != "mlx"}
    if bad:
        raise ValueError(f"recipe {recipe!r} uses non-mlx formats {sorted(bad)}")
    model = load_model(src, dtype=torch.float32)
    inv = checkpoint_inventory(cfg)
    tensors: dict[str, torch.Tensor] = {}
    qblock: dict = {}

    def float_of(hf: str) -> torch.Tensor:
        return checkpoint_tensor(model, hf)

    def put(mlx_name: str, hf: str, value: torch.Tensor | None = None, keep_dtype: torch.dtype | None = None):
        """Write one module's tensor(s): quantized by the recipe / stored parts, else float."""
        prefix = mlx_name.removesuffix(".weight")
        fmt = plan.get(hf, KEEP) if recipe else KEEP
        if value is not None and fmt != KEEP:
            fmt = fit_format(fmt, (1, value.shape[-1]))  # split / stacked tensors: fit their own row width
            if fmt in ("f16", "bf16", "f32"):
                fmt = KEEP
        holder = model.get_submodule(hf.rpartition(".")[0]) if hf in stored else None
        if recipe is None and value is None and hasattr(holder, "_parts"):  # stored mlx parts, as they are
            parts = dict(holder._parts("q"))
            parts["weight"] = parts["weight"].view(torch.uint32)
            tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
            qblock[prefix] = _mlx_entry(stored[hf])
            return
        w = float_of(hf) if value is None else value
        if fmt == KEEP:
            tensors[mlx_name] = w.to(keep_dtype or fdt).contiguous()
            return
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in _quantize_stack(fmt, w.to(fdt)).items()})
        qblock[prefix] = _mlx_entry(fmt)

    for hf, shape in inv.items():
        if ".experts." in hf or hf.endswith(("kv_b_proj.weight", "_conv1d.weight")):
            continue
        name = hf.replace(".block_sparse_moe.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
        name = name.replace(".block_sparse_moe.", ".mlp.")
        keep32 = hf.endswith(("A_log", "dt_bias", "e_score_correction_bias"))
        put(name, hf, keep_dtype=torch.float32 if keep32 else None)
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if kind == LAYER_MLA:
            m = cfg.mla
            w_uk, w_uv = split_kv_b(float_of(a + "kv_b_proj.weight"), m.num_heads, m.qk_nope_head_dim, m.v_head_dim)
            put(a + "embed_q.weight", a + "kv_b_proj.weight", w_uk.transpose(1, 2))  # [H, R, N]
            put(a + "unembed_out.weight", a + "kv_b_proj.weight", w_uv)  # [H, Vh, R]
        else:
            for x in "qkv":
                w = float_of(f"{a}{x}_conv1d.weight")  # [P, 1, W] -> mlx depthwise conv [P, W, 1]
                tensors[f"{a}{x}_conv.conv.weight"] = w.permute(0, 2, 1).to(fdt).contiguous()
        if cfg.is_moe(i):
            E = cfg.moe.num_experts
            for proj, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                names = [f"{p}block_sparse_moe.experts.{e}.{proj}.weight" for e in range(E)]
                prefix = f"{p}mlp.switch_mlp.{dst}"
                if recipe is None and names[0] in stored:
                    ex = model.get_submodule(f"{p}block_sparse_moe.experts")
                    parts = dict(ex._parts(proj))
                    parts["weight"] = parts["weight"].view(torch.uint32)
                    tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
                    qblock[prefix] = _mlx_entry(stored[names[0]])
                else:
                    put(prefix + ".weight", names[0], torch.stack([float_of(n) for n in names]))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        conf = json.loads((src / "config.json").read_text())
        conf.pop("quantization_config", None)
        conf["torch_dtype"] = conf["dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
        if qblock:
            entries = [v for v in qblock.values()]
            top = max(entries, key=entries.count)
            block = {**top, **{k: v for k, v in qblock.items() if v != top}}
            conf["quantization"] = conf["quantization_config"] = block
        _write_small(tmp / "config.json", json.dumps(conf, indent=2) + "\n")
        for f in ("tokenizer_config.json", "chat_template.jinja", "tiktoken.model"):
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
        hf_tokenizer_json(Tokenizer.from_dir(src), load_tiktoken_model(src / "tiktoken.model"), tmp / "tokenizer.json")
        sums = {p.name: _sha256(p) for p in tmp.iterdir()}
        _write_small(tmp / SUMS_FILE, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nq = len(qblock)
    log(f"wrote {out}: {len(tensors)} tensors, {nq} quantized modules, "
        f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")
    return out

