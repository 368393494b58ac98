"""Quantized checkpoints on disk: ``kimiq quantize`` (streaming, atomic) and loading them back.

Layout: the real checkpoint layout, with each quantized ``X.weight`` stored as its format's parts
(``X.weight`` packed codes, plus ``X.scales`` / ``X.biases`` for mlx formats; GGUF formats keep
llama.cpp's block bytes as ``uint8 [out, blocks*bytes]``), every other tensor unchanged.  config.json
gains ``quantization_config``::

    {"quant_method": "kimiq", "recipe": NAME, "recipe_doc": ..., "bits_per_weight": B,
     "formats": {"<checkpoint tensor name>": "<format>", ...}}      # quantized tensors only

Writing streams one tensor at a time (peak memory: one tensor and its parts): the header of each
output shard is computed from the formats' layouts first, then every tensor is read, quantized and
appended.  Everything goes to a temporary directory renamed into place at the end, so a killed run
leaves nothing that loads and re-running starts clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from kimiq.config import ModelConfig
from kimiq.model.model import KimiLinearForCausalLM, keep_fp32
from kimiq.model.weights import (
    _DTYPES,
    _ST_NAME,
    INDEX_FILE,
    SINGLE_FILE,
    SUMS_FILE,
    CheckpointError,
    _fmt,
    _internal,
    _plan,
    _scan,
    _sha256,
    _write_small,
    checkpoint_inventory,
    quantization_config,
)

from .compressed import compressed_tensors_config, ct_as_affine, dequantize_int4_ct
from .formats import get_format
from .modules import quantized_modules
from .recipes import KEEP, Recipe, get_recipe, plan_bytes

__all__ = ["quantize_checkpoint", "load_quantized", "expected_tensors"]

_MODEL_FILES = (SINGLE_FILE, INDEX_FILE, "config.json", SUMS_FILE)


def _part_name(name: str, suffix: str) -> str:
    return name if suffix == "weight" else name.removesuffix("weight") + suffix


def expected_tensors(cfg: ModelConfig, formats: dict[str, str], src_dtypes: dict[str, torch.dtype] | None = None):
    """Stored tensor name -> (shape, allowed safetensors dtypes) of a quantized checkpoint."""
    out = {}
    floats = frozenset(_DTYPES)
    for name, shape in checkpoint_inventory(cfg).items():
        fmt = formats.get(name, KEEP)
        if fmt == KEEP:
            out[name] = (shape, floats)
            continue
        dt = (src_dtypes or {}).get(name, torch.bfloat16)
        for suffix, (pshape, pdt) in get_format(fmt).layout(shape, dt).items():
            allowed = floats if pdt.is_floating_point else frozenset({_ST_NAME[pdt]})
            out[_part_name(name, suffix)] = (tuple(pshape), allowed)
    return out


class _Source:
    """The checkpoint being quantized: full precision, or compressed-tensors INT4 (``kimiq.quant.compressed``).

    ``get(name)`` returns one float tensor (dequantized for INT4 ones); ``int4(name)`` the packed pair.
    """

    def __init__(self, root: Path, cfg: ModelConfig):
        self.root, self.cfg = root, cfg
        self.ct = compressed_tensors_config(root)
        inv = checkpoint_inventory(cfg)
        self.packed: set[str] = set()
        if self.ct is None:
            loc, problems = _scan(root, cfg)
        else:  # headers tell which Linears are packed; check those against the INT4 layout
            loc, problems = _scan(root, cfg, self._ct_expected(inv))
        if problems:
            raise CheckpointError(_fmt(root, [m for _, m in problems]))
        self.loc = loc
        self.dtype = {n: _DTYPES[loc[n if n not in self.packed else _ct(n, "weight_scale")][1].dtype] for n in inv}
        self._handles: dict[str, object] = {}

    def _ct_expected(self, inv):
        from kimiq.model.weights import _read_header

        names = set()
        for f in self.root.glob("*.safetensors"):
            names |= set((_read_header(f)[0] or {}).keys())
        g = self.ct["group_size"]
        floats = frozenset(_DTYPES)
        expected = {}
        for name, shape in inv.items():
            if name not in names and _ct(name, "weight_packed") in names and len(shape) == 2:
                self.packed.add(name)
                expected[_ct(name, "weight_packed")] = ((shape[0], -(-shape[1] // 8)), frozenset({"I32"}))
                expected[_ct(name, "weight_scale")] = ((shape[0], shape[1] // g), floats)
                if _ct(name, "weight_shape") in names:
                    expected[_ct(name, "weight_shape")] = ((2,), frozenset({"I32", "I64"}))
            else:
                expected[name] = (shape, floats)
        return expected

    def _tensor(self, name: str) -> torch.Tensor:
        f = self.loc[name][0]
        if f not in self._handles:
            self._handles[f] = safe_open(str(self.root / f), framework="pt", device="cpu")
        return self._handles[f].get_tensor(name)

    def int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensor(_ct(name, "weight_packed")), self._tensor(_ct(name, "weight_scale"))

    def get(self, name: str) -> torch.Tensor:
        if name in self.packed:
            return dequantize_int4_ct(*self.int4(name), checkpoint_inventory_shape(self.cfg, name))
        return self._tensor(name)


def _ct(name: str, suffix: str) -> str:
    return name.removesuffix("weight") + suffix


def checkpoint_inventory_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    return tuple(checkpoint_inventory(cfg)[name])


def quantize_checkpoint(
    src: str | Path, recipe: str | Recipe, out: str | Path, *, imatrix: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 4 * 10**9, overwrite: bool = False, progress: bool = True,
    log: Callable[[str], None] = print, extra_files: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Quantize checkpoint ``src`` with ``recipe`` into ``out`` (see the module docstring).  ``extra_files``
    (name -> text) are written into ``out`` with the rest, inside the same atomic rename and in SHA256SUMS."""
    src, out = Path(src), Path(out)
    recipe = get_recipe(recipe) if not isinstance(recipe, Recipe) else recipe
    cfg = ModelConfig.from_file(src)
    if compressed_tensors_config(src) is None and quantization_config(src) is not None:
        raise CheckpointError(f"{src} is already quantized; quantize from the full-precision checkpoint")
    source = _Source(src, cfg)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    plan = recipe.plan(cfg)
    src_dt = source.dtype
    lossless = {}  # INT4 source tensors the recipe keeps: stored as they are (mlx affine 4-bit layout)
    for name in source.packed:
        if plan[name] == KEEP:
            fmt, _ = ct_as_affine(*source.int4(name), checkpoint_inventory_shape(cfg, name))
            plan[name] = lossless[name] = fmt
    formats = {k: v for k, v in plan.items() if v != KEEP}

    def produce(name: str) -> dict[str, torch.Tensor]:
        """The stored parts of one checkpoint tensor (one tensor in memory at a time)."""
        if name in lossless:
            return ct_as_affine(*source.int4(name), checkpoint_inventory_shape(cfg, name))[1]
        w = source.get(name)
        if plan[name] == KEEP:
            return {"weight": w}
        fmt = get_format(plan[name])
        parts = fmt.quantize(w, imatrix.get(name) if imatrix else None)
        # float parts (mlx scales / biases) in the checkpoint dtype, also when w came dequantized from INT4
        layout = fmt.layout(tuple(w.shape), src_dt[name])
        return {k: v.to(layout[k][1]) if v.is_floating_point() else v for k, v in parts.items()}

    # output tensors in inventory order, with their stored shapes and dtypes, known before quantizing anything
    items: list[tuple[str, str, str | None, tuple[int, ...], torch.dtype]] = []  # (stored, source, suffix, ...)
    for name, shape in checkpoint_inventory(cfg).items():
        fmt = plan[name]
        if fmt == KEEP:
            items.append((name, name, "weight", tuple(shape), src_dt[name]))
        else:
            for suffix, (pshape, pdt) in get_format(fmt).layout(shape, src_dt[name]).items():
                items.append((_part_name(name, suffix), name, suffix, tuple(pshape), pdt))
    sizes = [torch.Size(s).numel() * dt.itemsize for _, _, _, s, dt in items]
    groups = _plan(sizes, 1, max_shard_bytes)
    total_q, n_params = plan_bytes(cfg, plan)
    if source.packed:
        log(f"{src}: compressed-tensors INT4 source ({len(source.packed)} packed tensors, group "
            f"{source.ct['group_size']}); {len(lossless)} kept losslessly, the rest re-quantized from INT4")
    qc = {"quant_method": "kimiq", "recipe": recipe.name, "recipe_doc": recipe.doc,
          **({"source": "compressed-tensors pack-quantized INT4"} if source.packed else {}),
          "bits_per_weight": round(8 * total_q / n_params, 4), "imatrix": bool(imatrix), "formats": formats}
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # leftovers of killed runs
        if not _pid_alive(stale.name.split("-")[-2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        bar = tqdm(total=len(plan), desc=f"quantize {recipe.name}", unit="tensor", disable=not progress)
        sums, weight_map = {}, {}
        cache: tuple[str, dict[str, torch.Tensor]] | None = None  # parts of the tensor being written
        for g, idx in enumerate(groups):
            fname = SINGLE_FILE if len(groups) == 1 else f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
            header, off = {"__metadata__": {"format": "pt", "quantized_by": "kimiq"}}, 0
            for i in idx:
                stored, _, _, shape, dt = items[i]
                header[stored] = {"dtype": _ST_NAME[dt], "shape": list(shape), "data_offsets": [off, off + sizes[i]]}
                off += sizes[i]
                weight_map[stored] = fname
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            h = hashlib.sha256()
            with open(tmp / fname, "wb") as fh:
                for chunk in (len(hb).to_bytes(8, "little"), hb):
                    fh.write(chunk)
                    h.update(chunk)
                for i in idx:
                    stored, name, suffix, shape, dt = items[i]
                    if cache is None or cache[0] != name:
                        cache = (name, produce(name))
                        bar.update(1)
                    t = cache[1][suffix]
                    if tuple(t.shape) != shape or t.dtype != dt:
                        raise RuntimeError(f"{stored}: produced {t.dtype} {tuple(t.shape)}, layout said {dt} {shape}"
                                           " (a kimiq bug)")
                    buf = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                    fh.write(buf)
                    h.update(buf)
                fh.flush()
                os.fsync(fh.fileno())
            sums[fname] = h.hexdigest()
        bar.close()
        if len(groups) > 1:
            _write_small(tmp / INDEX_FILE, json.dumps({"metadata": {"total_size": sum(sizes)},
                                                       "weight_map": weight_map}, indent=2) + "\n")
        conf = json.loads((src / "config.json").read_text())
        conf["quantization_config"] = qc
        _write_small(tmp / "config.json", json.dumps(conf, indent=2) + "\n")
        for p in sorted(src.iterdir()):  # tokenizer, chat template, ...
            if p.is_file() and p.name not in _MODEL_FILES and not p.name.endswith(".safetensors"):
                shutil.copyfile(p, tmp / p.name)
        for fname, text in (extra_files or {}).items():
            _write_small(tmp / fname, text)
        for p in tmp.iterdir():
            sums.setdefault(p.name, _sha256(p))
        _write_small(tmp / SUMS_FILE, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: recipe {recipe.name}, {len(formats)} of {len(plan)} tensors quantized, "
        f"{qc['bits_per_weight']:.3f} bits per weight, {sum(sizes) / 1e6:.1f} MB")
    return out


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def load_quantized(root: Path, cfg: ModelConfig, *, dtype: torch.dtype, device="cpu", kda_impl: str = "torch",
                   strict: bool = True) -> KimiLinearForCausalLM:
    """Load a kimiq-quantized checkpoint: float tensors as usual, quantized ones into quantized modules."""
    qc = quantization_config(root)
    formats = qc.get("formats", {})
    inv = checkpoint_inventory(cfg)
    bad = [f"quantization_config names {k!r}, not a tensor of this config" for k in formats if k not in inv]
    bad += [f"{k}: unknown format {v!r}" for k, v in formats.items() if _unknown(v)]
    if bad:
        raise CheckpointError(_fmt(root, bad))
    expected = expected_tensors(cfg, formats)
    loc, problems = _scan(root, cfg, expected)
    fatal = [msg for kind, msg in problems if strict or kind != "unexpected"]
    if fatal:
        raise CheckpointError(_fmt(root, fatal))
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg, kda_impl=kda_impl)
    handles: dict[str, object] = {}

    def tensor(name: str) -> torch.Tensor:
        f = loc[name][0]
        if f not in handles:
            handles[f] = safe_open(str(root / f), framework="pt", device="cpu")
        return handles[f].get_tensor(name)  # lazy mmap view: callers copy

    stacks: dict[str, torch.Tensor] = {}
    for name in inv:
        if name in formats:
            continue
        iname, row = _internal(name)
        holder_name, _, leaf = iname.rpartition(".")
        holder = model.get_submodule(holder_name)
        meta = getattr(holder, leaf)
        dt = torch.float32 if keep_fp32(iname) else dtype
        if row is not None:
            if iname not in stacks:
                stacks[iname] = torch.empty(meta.shape, dtype=dt, device=device)
            stacks[iname][row].copy_(tensor(name))
            t = stacks[iname]
        else:
            t = tensor(name).to(device=device, dtype=dt, copy=True)
        is_param = isinstance(meta, torch.nn.Parameter)
        setattr(holder, leaf, torch.nn.Parameter(t, meta.requires_grad) if is_param else t)

    def get_parts(name: str, fmt: str) -> dict[str, torch.Tensor]:
        layout = get_format(fmt).layout(inv[name], dtype)
        return {s: tensor(_part_name(name, s)).to(device=device, copy=True) for s in layout}

    quantized_modules(model, {n: formats.get(n, KEEP) for n in inv}, get_parts, dtype)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" not in formats:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {root}: parameters not filled: {left[:20]}")
    model.quantization_plan = {"recipe": qc.get("recipe"), "formats": formats}
    return model.eval()


def _unknown(fmt: str) -> bool:
    try:
        get_format(fmt)
        return False
    except KeyError:
        return True
