"""Checkpoint I/O: the real Hugging Face Kimi-Linear safetensors layout <-> ``KimiLinearForCausalLM``.

Owns the tensor inventory of a config (``checkpoint_inventory``: every name and shape a real checkpoint has,
``kimi-linear-architecture.md`` §7), streaming load (``load_model``), writing (``save_checkpoint``) and the
header-only check behind ``kimiq verify DIR`` (``verify_checkpoint``).

Layout: ``config.json``; ``model.safetensors``, or ``model-0000N-of-0000M.safetensors`` shards plus
``model.safetensors.index.json`` (``weight_map``: name -> shard); optional ``SHA256SUMS``.  Internal names equal
the checkpoint's except routed experts, which are stacked: ``experts.{e}.w1.weight`` [I, D] is row e of
``experts.w1`` [E, I, D] (same for ``w3`` [I, D] and ``w2`` [D, I]).

Every shard's header (8-byte little-endian length + JSON) is read and checked before any tensor: missing /
unexpected / mis-shaped tensors, index entries pointing at absent shards or names, and shards shorter than their
header declares.  The last matters: safetensors 0.8's ``get_tensor`` returns a lazy view of a private mmap, so
touching the data of a file truncated mid-data dies with SIGBUS instead of raising.  Loaded tensors are copied out
of the mmap, so the model does not depend on the files afterwards.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from kimiq.config import LAYER_KDA, ConfigError, ModelConfig
from kimiq.model.model import KimiLinearForCausalLM, keep_fp32

__all__ = ["CheckpointError", "VerifyReport", "checkpoint_inventory", "load_model", "save_checkpoint",
           "verify_checkpoint", "INDEX_FILE", "SINGLE_FILE", "SUMS_FILE"]  # fmt: skip

INDEX_FILE, SINGLE_FILE, SUMS_FILE = "model.safetensors.index.json", "model.safetensors", "SHA256SUMS"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_QDTYPES = {"U8": torch.uint8, "I32": torch.int32}  # packed quantized parts (kimiq.quant)
_ST_NAME = {dt: name for name, dt in (_DTYPES | _QDTYPES).items()}
_EXPERT_ROW = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$")
_EXPERT_STACK = re.compile(r"^(.*\.experts)\.(w[123])$")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_SHOW = 20  # problems listed in an error message


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (the message names each tensor and file)."""


# --------------------------------------------------------------------------------------------------- inventory
def checkpoint_inventory(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape of a real checkpoint of ``cfg``, in layer order (§7; 20,493 for the 48B)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    inv: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        inv[p + "input_layernorm.weight"] = (D,)
        inv[p + "post_attention_layernorm.weight"] = (D,)
        if kind == LAYER_KDA:
            H, K, W = cfg.kda.num_heads, cfg.kda.head_dim, cfg.kda.short_conv_kernel_size
            P = H * K
            inv.update({f"{a}{x}_proj.weight": (P, D) for x in "qkv"})
            inv.update({f"{a}{x}_conv1d.weight": (P, 1, W) for x in "qkv"})
            inv.update({a + "A_log": (1, 1, H, 1), a + "dt_bias": (P,), a + "f_a_proj.weight": (K, D),
                        a + "f_b_proj.weight": (P, K), a + "b_proj.weight": (H, D), a + "g_a_proj.weight": (K, D),
                        a + "g_b_proj.weight": (P, K), a + "o_norm.weight": (K,),
                        a + "o_proj.weight": (D, P)})  # fmt: skip
        else:
            m = cfg.mla
            inv.update({a + "q_proj.weight": (m.num_heads * m.qk_head_dim, D),
                        a + "kv_a_proj_with_mqa.weight": (m.latent_dim, D),
                        a + "kv_a_layernorm.weight": (m.kv_lora_rank,),
                        a + "kv_b_proj.weight": (m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                        a + "o_proj.weight": (D, m.num_heads * m.v_head_dim)})  # fmt: skip
        if cfg.is_moe(i):
            assert cfg.moe is not None
            E, I, b = cfg.moe.num_experts, cfg.moe.moe_intermediate_size, p + "block_sparse_moe."
            inv[b + "gate.weight"] = (E, D)
            inv[b + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                inv.update({f"{b}experts.{e}.w1.weight": (I, D), f"{b}experts.{e}.w2.weight": (D, I),
                            f"{b}experts.{e}.w3.weight": (I, D)})  # fmt: skip
            S = I * cfg.moe.num_shared_experts
            if S:
                inv.update({b + "shared_experts.gate_proj.weight": (S, D), b + "shared_experts.up_proj.weight": (S, D),
                            b + "shared_experts.down_proj.weight": (D, S)})  # fmt: skip
        else:
            F = cfg.intermediate_size
            inv.update({p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                        p + "mlp.down_proj.weight": (D, F)})  # fmt: skip
    inv["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        inv["lm_head.weight"] = (V, D)
    return inv


def _internal(name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (internal name, expert row or None)."""
    m = _EXPERT_ROW.match(name)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else (name, None)


# --------------------------------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets of the data
    end: int


def _read_header(path: Path) -> tuple[dict[str, _Entry] | None, list[tuple[str, str]]]:
    """Parse and check one shard's header against the file size; (entries or None if unreadable, problems)."""
    f, size = path.name, path.stat().st_size
    if size < 8:
        return None, [("truncated", f"{f} is truncated in its header: {size} bytes, less than the 8-byte length")]
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            return None, [("truncated", f"{f} is truncated in its header: declares {n} header bytes, has {size - 8}")]
        if n > _MAX_HEADER:
            return None, [("corrupt", f"{f}: header length {n} is implausible (corrupt file)")]
        try:
            raw = json.loads(fh.read(n))
            raw.pop("__metadata__", None)
            entries = {k: _Entry(v["dtype"], tuple(int(s) for s in v["shape"]), 8 + n + int(v["data_offsets"][0]),
                                 8 + n + int(v["data_offsets"][1])) for k, v in raw.items()}  # fmt: skip
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return None, [("corrupt", f"{f}: unreadable safetensors header ({type(e).__name__}: {e})")]
    problems, pos, cut = [], 8 + n, []
    for k, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        item = (_DTYPES | _QDTYPES)[e.dtype].itemsize if e.dtype in _DTYPES | _QDTYPES else None
        if e.start != pos or (item is not None and e.end - e.start != math.prod(e.shape) * item):
            problems.append(("corrupt", f"{f}: tensor {k!r} has inconsistent data_offsets (corrupt header)"))
        cut += [(k, e.end)] if e.end > size else []
        pos = max(pos, e.end)
    if cut:  # the first tensor whose data is cut off, then a count
        more = f" (and {len(cut) - 1} later tensors)" if len(cut) > 1 else ""
        problems.append(("truncated", f"{f} is truncated: tensor {cut[0][0]!r} needs bytes up to {cut[0][1]}, "
                                      f"file has {size}{more}"))  # fmt: skip
    elif not problems and pos != size:
        problems.append(("corrupt", f"{f}: {size - pos} bytes after the last tensor's data (corrupt file)"))
    return entries, problems


def _scan(
    root: Path, cfg: ModelConfig, expected: dict[str, tuple[tuple[int, ...], frozenset[str]]] | None = None,
) -> tuple[dict[str, tuple[str, _Entry]], list[tuple[str, str]]]:  # fmt: skip
    """Locate every expected tensor from headers only: ({name: (shard, entry)}, [(kind, message)]).

    ``expected``: name -> (shape, allowed safetensors dtypes); default the config's inventory in float dtypes
    (a quantized checkpoint passes its packed parts, ``kimiq.quant.checkpoint``).
    """
    if expected is None:
        expected = {k: (v, frozenset(_DTYPES)) for k, v in checkpoint_inventory(cfg).items()}
    inv = {k: v[0] for k, v in expected.items()}
    problems: list[tuple[str, str]] = []
    if (root / INDEX_FILE).is_file():
        src = INDEX_FILE
        try:
            wm = json.loads((root / INDEX_FILE).read_text())["weight_map"]
            assert isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            return {}, [("corrupt", f"{INDEX_FILE}: not a valid index with a weight_map ({type(e).__name__}: {e})")]
        files = sorted(set(wm.values()))
    elif (root / SINGLE_FILE).is_file():
        src, wm, files = SINGLE_FILE, None, [SINGLE_FILE]
    else:
        return {}, [("missing", f"no {INDEX_FILE} or {SINGLE_FILE} in {root}")]
    headers: dict[str, dict[str, _Entry] | None] = {}
    for f in files:
        if not (root / f).is_file():
            problems.append(("missing", f"shard {f} named in {INDEX_FILE} does not exist"))
            continue
        headers[f], probs = _read_header(root / f)
        problems += probs
    if wm is None:
        wm = {k: SINGLE_FILE for k in headers.get(SINGLE_FILE) or {}}
    loc: dict[str, tuple[str, _Entry]] = {}
    for name, f in wm.items():
        if name not in inv:
            problems.append(("unexpected", f"unexpected tensor {name!r} in {f} (not in this config's inventory)"))
            continue
        ents = headers.get(f)
        ent = ents.get(name) if ents else None
        if f not in headers:
            problems.append(("missing", f"missing tensor {name!r}: {INDEX_FILE} maps it to {f}, which does not exist"))
        elif ents is None:
            problems.append(("missing", f"missing tensor {name!r}: {f} has an unreadable header"))
        elif ent is None:
            problems.append(("missing", f"missing tensor {name!r}: {src} maps it to {f}, which does not contain it"))
        elif ent.shape != inv[name]:
            got, want = list(ent.shape), list(inv[name])
            problems.append(("shape", f"tensor {name!r} in {f} has shape {got}, expected {want}"))
        elif ent.dtype not in expected[name][1]:
            want = sorted(expected[name][1])
            problems.append(("dtype", f"tensor {name!r} in {f} has dtype {ent.dtype}; expected one of {want}"))
        else:
            loc[name] = (f, ent)
    for name in inv:
        if name not in wm:
            where = [f for f, ents in headers.items() if ents and name in ents]
            extra = f" (but {where[0]} contains it)" if where else ""
            problems.append(("missing", f"missing tensor {name!r}: not in {src}{extra}"))
    for f, ents in headers.items():
        problems += [("unexpected", f"unexpected tensor {k!r} in {f} (not in {INDEX_FILE} nor in this config's "
                      "inventory)") for k in ents or {} if k not in wm and k not in inv]  # fmt: skip
    return loc, problems


def _fmt(root: Path, msgs: list[str]) -> str:
    more = f"\n  ... and {len(msgs) - _SHOW} more" if len(msgs) > _SHOW else ""
    return f"checkpoint {root}: {len(msgs)} problem(s):\n  - " + "\n  - ".join(msgs[:_SHOW]) + more


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"not a floating dtype: {dtype!r}")
    return dt


# --------------------------------------------------------------------------------------------------- load
def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    kda_impl: str = "torch", strict: bool = True,
) -> KimiLinearForCausalLM:  # fmt: skip
    """Build the model on the meta device and stream the checkpoint into it, tensor by tensor, in eval mode.

    ``dtype`` defaults to config.json's; parameters in ``keep_fp32`` stay fp32.  All shard headers are checked
    first (``CheckpointError`` naming tensor and file).  ``strict=False`` only tolerates unexpected tensors
    (e.g. extra heads): a missing or mis-shaped tensor is always an error, as the model could not run.
    """
    root = Path(path)
    cfg = ModelConfig.from_file(root)
    target = _as_dtype(dtype if dtype is not None else cfg.dtype)
    if quantization_config(root) is not None:
        from kimiq.quant.checkpoint import load_quantized

        return load_quantized(root, cfg, dtype=target, device=device, kda_impl=kda_impl, strict=strict)
    loc, problems = _scan(root, cfg)
    fatal = [msg for kind, msg in problems if strict or kind != "unexpected"]
    if fatal:
        raise CheckpointError(_fmt(root, fatal))
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg, kda_impl=kda_impl)
    slots = {n: (p, True) for n, p in model.named_parameters()} | {n: (b, False) for n, b in model.named_buffers()}
    _check_mapping(cfg, slots)
    by_file: dict[str, list[str]] = {}
    for name, (f, _) in loc.items():
        by_file.setdefault(f, []).append(name)
    stacks: dict[str, torch.Tensor] = {}
    for f in sorted(by_file):
        with safe_open(str(root / f), framework="pt", device="cpu") as st:
            for name in by_file[f]:
                iname, row = _internal(name)
                meta, is_param = slots[iname]
                dt = torch.float32 if keep_fp32(iname) else target
                src = st.get_tensor(name)  # lazy mmap view: copy out, never keep
                if row is not None and iname in stacks:
                    stacks[iname][row].copy_(src)
                    continue
                if row is None:
                    t = src.to(device=device, dtype=dt, copy=True)
                else:  # first row of a stacked expert tensor: allocate [E, ...] once
                    t = stacks[iname] = torch.empty(meta.shape, dtype=dt, device=device)
                    t[row].copy_(src)
                mod_name, _, leaf = iname.rpartition(".")
                setattr(model.get_submodule(mod_name), leaf, nn.Parameter(t, meta.requires_grad) if is_param else t)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {root}: parameters not filled: {left[:_SHOW]}")
    return model.eval()


def quantization_config(root: Path) -> dict | None:
    """config.json's ``quantization_config`` when it is kimiq's own (``quant_method: "kimiq"``), else None."""
    qc = json.loads((Path(root) / "config.json").read_text()).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "kimiq":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"checkpoint {root}: quantization_config with quant_method {method!r} is not loadable "
                              "directly; convert it with `kimiq quantize` (compressed-tensors) first")
    return qc


def _check_mapping(cfg: ModelConfig, slots: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """The inventory must cover every model parameter/buffer exactly (guards against model/inventory drift)."""
    rows: dict[str, int] = {}
    bad = []
    for name, shape in checkpoint_inventory(cfg).items():
        iname, row = _internal(name)
        meta = slots.get(iname, (None,))[0]
        want = None if meta is None else tuple(meta.shape[1:] if row is not None else meta.shape)
        if want != shape:
            bad.append(f"{name} {list(shape)} -> {iname} {want}")
        rows[iname] = rows.get(iname, 0) + 1
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for iname, (meta, _) in slots.items():
        n = meta.shape[0] if _EXPERT_STACK.match(iname) else 1
        if iname not in skip and rows.get(iname) != n:
            bad.append(f"{iname} filled by {rows.get(iname, 0)} checkpoint tensors, needs {n}")
    if bad:
        raise RuntimeError("kimiq model and checkpoint_inventory disagree (a kimiq bug): " + "; ".join(bad[:_SHOW]))


# --------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor], out_dir: str | Path, *, n_shards: int | None = None,
    max_shard_bytes: int | None = None, dtype: torch.dtype | str | None = None, config: ModelConfig | None = None,
    extra_files: Iterable[str | Path] = (), overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write a checkpoint in the real layout (experts un-stacked) with config.json and SHA256SUMS, atomically.

    Internal (stacked) or checkpoint names are accepted.  Shards: ``n_shards`` (default 1) of about equal bytes, or
    greedy up to ``max_shard_bytes``; an index is written when there is more than one.  ``dtype`` casts floating
    tensors (``keep_fp32`` ones stay fp32) and becomes config.json's dtype; None keeps each tensor's dtype.
    ``extra_files`` (e.g. tokenizer files) are copied in.  Everything is written into a temporary directory next
    to ``out_dir`` and renamed into place, so an interrupted save leaves no loadable half-checkpoint.
    """
    if n_shards is not None and max_shard_bytes is not None:
        raise ValueError("give n_shards or max_shard_bytes, not both")
    if isinstance(model_or_state_dict, nn.Module):
        sd, cfg = model_or_state_dict.state_dict(), config or model_or_state_dict.config
    elif config is None:
        raise ValueError("saving a state dict needs config=")
    else:
        sd, cfg = dict(model_or_state_dict), config
    target = _as_dtype(dtype) if dtype is not None else None
    if target is not None:
        cfg = replace(cfg, dtype=str(target).removeprefix("torch."))
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    tensors = _checkpoint_layout(sd, cfg)
    names = list(tensors)  # final dtype per tensor; keep_fp32 ones are never downcast
    dts = {k: t.dtype if target is None else torch.float32 if keep_fp32(k) else target for k, t in tensors.items()}
    sizes = [tensors[k].numel() * dts[k].itemsize for k in names]
    groups = _plan(sizes, n_shards or 1, max_shard_bytes)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        sums, weight_map = {}, {}
        for g, idx in enumerate(groups):
            fname = SINGLE_FILE if len(groups) == 1 else f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
            items = [(names[i], tensors[names[i]], dts[names[i]]) for i in idx]
            sums[fname] = _write_shard(tmp / fname, sorted(items, key=lambda it: -it[2].itemsize))
            weight_map.update({names[i]: fname for i in idx})
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            _write_small(tmp / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        _write_small(tmp / "config.json", json.dumps(cfg.to_hf(), indent=2) + "\n")
        for p in map(Path, extra_files):
            shutil.copyfile(p, tmp / p.name)
        for p in tmp.iterdir():
            sums.setdefault(p.name, _sha256(p))
        _write_small(tmp / SUMS_FILE, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
        old = None
        if out.exists() and overwrite:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        os.replace(tmp, out)  # replaces an empty directory atomically
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _checkpoint_layout(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Un-stack experts, drop a tied lm_head, check against the inventory; returns inventory order."""
    flat: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = _EXPERT_STACK.match(name)
        if m and t.dim() == 3:
            flat.update({f"{m[1]}.{e}.{m[2]}.weight": t[e] for e in range(t.shape[0])})
        elif not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            flat[name] = t
    inv = checkpoint_inventory(cfg)
    bad = [f"missing tensor {k!r} in the state dict" for k in inv if k not in flat]
    bad += [f"unexpected tensor {k!r} in the state dict" for k in flat if k not in inv]
    bad += [f"tensor {k!r} in the state dict has shape {list(t.shape)}, expected {list(inv[k])}"
            for k, t in flat.items() if k in inv and tuple(t.shape) != inv[k]]  # fmt: skip
    if bad:
        raise CheckpointError(_fmt(Path("<state dict>"), bad))
    return {k: flat[k] for k in inv}


def _plan(sizes: list[int], n_shards: int, max_bytes: int | None) -> list[list[int]]:
    """Split tensor indices (in order) into contiguous shards: greedy by max_bytes, or n of about equal bytes."""
    prefix, cuts = list(itertools.accumulate(sizes, initial=0)), [0]  # prefix[i]: bytes before tensor i
    if max_bytes is not None:  # greedy: cut before the tensor that would overflow the current shard
        for i in range(1, len(sizes)):
            if prefix[i + 1] - prefix[cuts[-1]] > max_bytes:
                cuts.append(i)
    elif not 1 <= n_shards <= len(sizes):
        raise ValueError(f"n_shards must be in [1, {len(sizes)}], got {n_shards}")
    else:
        for k in range(1, n_shards):  # first tensor at or past k/n of the bytes; every shard non-empty
            c = bisect.bisect_left(prefix, k * prefix[-1] / n_shards)
            cuts.append(min(max(c, cuts[-1] + 1), len(sizes) - (n_shards - k)))
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:] + [len(sizes)])]


def _write_shard(path: Path, items: list[tuple[str, torch.Tensor, torch.dtype]]) -> str:
    """Stream a safetensors file tensor by tensor (never a whole shard in memory); returns its sha256."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, t, dt in items:
        nb = t.numel() * dt.itemsize
        header[name] = {"dtype": _ST_NAME[dt], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (len(hb).to_bytes(8, "little"), hb):
            fh.write(chunk)
            h.update(chunk)
        for _, t, dt in items:
            buf = t.detach().to(device="cpu", dtype=dt).contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(buf)
            h.update(buf)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def _write_small(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    n_tensors: int = 0  # inventory tensors found intact in the headers
    n_hashed: int = 0  # files checked against SHA256SUMS

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else 'FAILED'} ({self.n_tensors} tensors, {self.n_hashed} files hashed)"
        return "\n  - ".join([head] + self.problems)


def verify_checkpoint(path: str | Path) -> VerifyReport:
    """SHA256SUMS (when present) and the tensor inventory against config.json, from headers only."""
    root = Path(path)
    rep = VerifyReport(root)
    sums = root / SUMS_FILE
    if sums.is_file():
        listed = set()
        for line in sums.read_text().splitlines():
            if not line.strip():
                continue
            digest, _, name = line.partition(" ")
            name = name.lstrip(" *")
            listed.add(name)
            if not (root / name).is_file():
                rep.problems.append(f"{name}: listed in {SUMS_FILE} but missing")
            elif _sha256(root / name) != digest.lower():
                rep.problems.append(f"{name}: sha256 mismatch (file differs from {SUMS_FILE})")
            else:
                rep.n_hashed += 1
        unlisted = [p.name for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
        rep.problems += [f"{n}: not listed in {SUMS_FILE}" for n in unlisted if n not in listed | {SUMS_FILE}]
    try:
        cfg = ModelConfig.from_file(root)
    except ConfigError as e:
        rep.problems.append(f"config.json: {e}")
        return rep
    expected = None
    try:
        qc = quantization_config(root)
    except CheckpointError as e:
        rep.problems.append(str(e))
        return rep
    if qc is not None:
        from kimiq.quant.checkpoint import expected_tensors

        expected = expected_tensors(cfg, qc.get("formats", {}))
    loc, problems = _scan(root, cfg, expected)
    rep.n_tensors = len(loc)
    rep.problems += [msg for _, msg in problems]
    return rep
