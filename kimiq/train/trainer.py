"""``kimiq train``: rebuild the tokenizer and a small Kimi-Linear from the stdlib sources, seeded, resumable.

    run_training(PRESETS["default"], work_dir="runs/default", out_dir="runs/default/model")

Steps, each skipped when its output already exists in ``work_dir`` (so a killed run resumes):

1. ``tokenizer/``: byte-level BPE on the train split (``kimiq.train.bpe``), written in the Kimi format.
2. ``train.npy`` / ``validation.npy``: token streams (``kimiq.train.data.encode_split``).
3. training: AdamW, linear warmup then cosine decay, gradient clipping; batch ``i`` is drawn from a
   generator seeded with ``(seed, i)``, so a resumed run sees exactly the batches an uninterrupted
   one would.  ``ckpt.pt`` (model, optimizer, step) is replaced atomically every ``ckpt_every`` steps;
   ``log.jsonl`` gets one line per step (loss, lr, tokens/s) and the validation losses.
4. ``out_dir``: the model in the real HF layout (bf16 weights, fp32 decay/router parameters), tokenizer
   files, chat template, SHA256SUMS.

Router bias: the aux-loss-free rule of DeepSeek-V3, which Kimi uses: after each step, every MoE layer's
``e_score_correction_bias`` moves by ``bias_rate * sign(mean load - load)`` per expert, using the expert
loads counted in that step's forward (read through forward hooks on the routers; model code untouched).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kimiq.config import ModelConfig
from kimiq.generate.engine import _sync

__all__ = ["Preset", "PRESETS", "run_training", "train_tokenizer", "export_model", "default_hf_config"]


def default_hf_config(vocab_size: int) -> dict[str, Any]:
    """The embedded default model: Kimi-Linear's layout scaled down (8 layers, KDA:MLA 3:1, dense first layer,
    6 routed experts top-2 + 1 shared, sigmoid router with correction bias, untied head).  Input widths of
    nearly every linear layer (hidden 256, KDA/MLA projections 256, kv_lora_rank 256, expert and dense
    intermediates 256 / 768) are multiples of 256 so GGUF k-quants apply."""
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 256,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
        "kv_lora_rank": 256, "q_lora_rank": None, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
        "v_head_dim": 64, "mla_use_nope": True,
        "linear_attn_config": {"full_attn_layers": [4, 8], "kda_layers": [1, 2, 3, 5, 6, 7], "head_dim": 64,
                               "num_heads": 4, "short_conv_kernel_size": 4},
        "num_experts": 6, "num_experts_per_token": 2, "num_shared_experts": 1,
        "moe_router_activation_func": "sigmoid", "moe_renormalize": True, "routed_scaling_factor": 2.446,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "use_grouped_topk": True,
        "num_expert_group": 1, "topk_group": 1, "hidden_act": "silu", "rope_theta": 10000.0,
        "rope_scaling": None, "rms_norm_eps": 1e-05, "model_max_length": 8192,
        "tie_word_embeddings": False, "bos_token_id": vocab_size - 256, "eos_token_id": vocab_size - 255,
        "pad_token_id": vocab_size - 1, "use_cache": True, "torch_dtype": "bfloat16",
    }  # fmt: skip


def _smoke_hf_config(vocab_size: int) -> dict[str, Any]:
    d = default_hf_config(vocab_size)
    d.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, head_dim=16, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=4)
    d["linear_attn_config"] = dict(d["linear_attn_config"], head_dim=16)
    return d


@dataclass(frozen=True)
class Preset:
    name: str
    vocab_size: int  # BPE merges + 256 bytes + 256 special tokens
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    bias_rate: float = 1e-3
    chat_every: int = 3  # every n-th docstring->code example joins the data as a chat
    file_limit: int | None = None  # first n files of each split (smoke runs)
    seed: int = 0
    amp: str | None = None  # "bf16": matmuls under torch.autocast (KDA recurrence and state stay fp32)
    kda_impl: str = "torch"  # "compile": inductor-compiled KDA chunk step (needs a C++ compiler)
    ckpt_every: int = 100
    eval_every: int = 100
    eval_batches: int = 4
    hf_overrides: dict[str, Any] = field(default_factory=dict)

    def hf_config(self) -> dict[str, Any]:
        make = _smoke_hf_config if self.name == "smoke" else default_hf_config
        return {**make(self.vocab_size), **self.hf_overrides}


PRESETS: dict[str, Preset] = {
    # ~7.8M training tokens (0.8 epoch of the train split).  bf16 autocast + compiled KDA: ~2.75 s/step,
    # ~90 min on 2 AVX512-BF16 CPU cores (about 4.4 s/step in fp32 eager); minutes on a GPU.
    "default": Preset("default", vocab_size=4096, seq_len=512, batch_size=8, steps=1900, lr=2e-3, warmup=100,
                      bias_rate=3e-3, amp="bf16", kda_impl="compile"),
    # CI-sized: the same pipeline on 40 files with a 64-wide model; seconds per hundred steps.
    "smoke": Preset("smoke", vocab_size=768, seq_len=64, batch_size=4, steps=200, lr=3e-3, warmup=20,
                    file_limit=40, ckpt_every=50, eval_every=100, eval_batches=2),
}


# ------------------------------------------------------------------------------------------------ pieces
def train_tokenizer(preset: Preset, out: Path, log=print) -> Path:
    from kimiq.tokenizer import NUM_SPECIAL, builtin_chat_template, write_tokenizer_files
    from kimiq.train.bpe import count_pieces, train_bpe
    from kimiq.train.data import read_source, split_files

    texts = (read_source(f) or "" for _, f in split_files("train", limit=preset.file_limit))
    t0 = time.perf_counter()
    pieces = count_pieces(texts)
    bar = _bar(preset.vocab_size - NUM_SPECIAL - 256, "BPE merges")
    done = [0]

    def progress(n: int, total: int) -> None:
        bar.update(n - done[0])
        done[0] = n

    ranks = train_bpe(pieces, preset.vocab_size - NUM_SPECIAL, progress=progress)
    bar.close()
    if len(ranks) != preset.vocab_size - NUM_SPECIAL:  # tiny corpora run out of pairs: pad with unused bytes
        raise RuntimeError(f"the corpus supports only {len(ranks)} BPE tokens; lower vocab_size")
    write_tokenizer_files(out, ranks, chat_template=builtin_chat_template())
    log(f"tokenizer: {len(ranks)} BPE tokens + {NUM_SPECIAL} special, {time.perf_counter() - t0:.0f}s")
    return out


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)


def _lr(preset: Preset, step: int) -> float:
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
    return preset.lr * (preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_at(tokens: np.ndarray, preset: Preset, step: int, salt: int = 0) -> torch.Tensor:
    """Batch ``step``: ``batch_size`` random windows of ``seq_len + 1`` tokens, seeded by (seed, salt, step)."""
    rng = np.random.default_rng([preset.seed, salt, step])
    starts = rng.integers(0, len(tokens) - preset.seq_len - 1, size=preset.batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + preset.seq_len + 1] for s in starts]).astype(np.int64))


class _LoadCounter:
    """Forward hooks on every MoE router: tokens routed to each expert during the current step."""

    def __init__(self, model):
        from kimiq.model.moe import Router

        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.loads = [torch.zeros(r.m.num_experts) for r in self.routers]
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(module, args, output) -> None:
            if not module.training:  # evaluation forwards must not steer the bias
                return
            idx = output[1]
            self.loads[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.loads[i])).float()

        return hook

    @torch.no_grad()
    def update_bias(self, rate: float) -> float:
        """Aux-loss-free step; returns the worst max/mean load ratio seen this step."""
        worst = 0.0
        for r, load in zip(self.routers, self.loads):
            mean = load.mean()
            r.e_score_correction_bias += rate * torch.sign(mean - load).to(r.e_score_correction_bias)
            worst = max(worst, float(load.max() / mean.clamp_min(1)))
            load.zero_()
        return worst


LOSS_ROWS = 2


def _loss(model, batch: torch.Tensor, amp: str | None = None) -> torch.Tensor:
    if amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    autocast = torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    with autocast:
        h = model(batch[:, :-1], return_hidden=True)  # [B, T, D]
    targets = batch[:, 1:]
    # The head + cross-entropy run LOSS_ROWS rows at a time: a full [B, T, V] fp32 logits tensor
    # (64 MB at the default preset) is above glibc's mmap threshold, so every step would map and
    # zero-fault fresh pages for it and its gradients (a third of the step time was kernel time).
    total = h.new_zeros((), dtype=torch.float32)
    for hc, tc in zip(h.split(LOSS_ROWS), targets.split(LOSS_ROWS)):
        with autocast:
            logits = model.lm_head(hc)  # [rows, T, V]
        total = total + F.cross_entropy(logits.float().flatten(0, 1), tc.flatten(), reduction="sum")
    return total / targets.numel()


@torch.no_grad()
def _eval(model, tokens: np.ndarray, preset: Preset, device) -> float:
    model.eval()
    losses = [float(_loss(model, batch_at(tokens, preset, i, salt=1).to(device), preset.amp))
              for i in range(preset.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_model(model, cfg: ModelConfig, preset: Preset, tok_dir: Path, out_dir: str | Path,
                 losses: list[float], device: str) -> Path:
    """The trained model in the real HF layout: bf16 weights (decay / router parameters fp32), tokenizer files,
    chat template, SHA256SUMS; config.json's ``kimiq`` block records how it was made and the first logged
    losses (what a re-run must reproduce)."""
    from kimiq.model.weights import save_checkpoint

    extra = [tok_dir / n for n in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")]
    info = {"trained_by": f"kimiq train --preset {preset.name}", "steps": preset.steps, "device": device,
            "amp": preset.amp, "kda_impl": preset.kda_impl,
            "torch": torch.__version__, "tokens": preset.steps * preset.batch_size * preset.seq_len,
            "first_losses": [round(x, 6) for x in losses[:20]],
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}
    cfg_out = replace(cfg, raw={**cfg.raw, "kimiq": info})
    return save_checkpoint(model.eval().cpu(), out_dir, dtype=torch.bfloat16, config=cfg_out,
                           extra_files=extra, overwrite=True)


# ------------------------------------------------------------------------------------------------ the run
def run_training(preset: Preset, work_dir: str | Path, out_dir: str | Path | None = None, *,
                 device: str = "cpu", steps: int | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) ``preset`` in ``work_dir``; export to ``out_dir`` when training is complete.

    ``steps`` stops early at that step (the schedule still follows ``preset.steps``), e.g. for a
    reproducibility check; the export then happens only if ``steps >= preset.steps``.
    Returns {"losses": [...], "step": n, "out": path or None}.
    """
    from kimiq.model.model import KimiLinearForCausalLM
    from kimiq.tokenizer import Tokenizer
    from kimiq.train.data import encode_split

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stop_at = preset.steps if steps is None else min(steps, preset.steps)

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        train_tokenizer(preset, work / "tokenizer.tmp", log)
        os.replace(work / "tokenizer.tmp", tok_dir)
    tok = Tokenizer.from_dir(tok_dir)

    data: dict[str, np.ndarray] = {}
    for split in ("train", "validation"):
        f = work / f"{split}.npy"
        if not f.exists():
            t0 = time.perf_counter()
            arr = encode_split(tok, split, limit=preset.file_limit,
                               chat_every=preset.chat_every if split == "train" else 0)
            np.save(work / f"{split}.tmp.npy", arr)
            os.replace(work / f"{split}.tmp.npy", f)
            log(f"{split}: {len(arr):,} tokens ({time.perf_counter() - t0:.0f}s)")
        data[split] = np.load(f)

    cfg = ModelConfig.from_hf(preset.hf_config())
    torch.manual_seed(preset.seed)
    model = KimiLinearForCausalLM(cfg, kda_impl=preset.kda_impl).init_weights(preset.seed).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=preset.lr, betas=(0.9, 0.95))
    step, losses = 0, []
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, losses = state["step"], state["losses"]
        log(f"resumed from {ckpt} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers {cfg.layer_types}; "
        f"{preset.batch_size}x{preset.seq_len} tokens/step, {preset.steps} steps")

    counter = _LoadCounter(model)
    log_path = work / "log.jsonl"  # keep only the steps the checkpoint has (a killed run may have logged more)
    kept = [ln for ln in (log_path.read_text().splitlines() if log_path.exists() else [])
            if json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in kept))
    logf = open(log_path, "a")
    bar = _bar(stop_at, f"train {preset.name}")
    bar.update(step)
    tok_per_step = preset.batch_size * preset.seq_len
    try:
        while step < stop_at:
            t0 = time.perf_counter()
            lr = _lr(preset, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = _loss(model, batch_at(data["train"], preset, step).to(device), preset.amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip))
            opt.step()
            imbalance = counter.update_bias(preset.bias_rate)
            step += 1
            losses.append(loss.item())
            _sync(torch.device(device))
            tps = tok_per_step / (time.perf_counter() - t0)
            rec: dict[str, Any] = {"step": step, "loss": round(losses[-1], 6), "lr": lr, "grad_norm": round(gnorm, 4),
                                   "max_load": round(imbalance, 3), "tok_s": round(tps, 1)}
            if step % preset.eval_every == 0 or step == preset.steps:
                rec["val_loss"] = round(_eval(model, data["validation"], preset, device), 6)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:.0f}",
                            **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
            bar.update(1)
            if step % preset.ckpt_every == 0 or step == stop_at:
                _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                              "losses": losses, "preset": preset.name}, ckpt)
    finally:
        bar.close()
        logf.close()
        for h in counter.handles:
            h.remove()

    out = None
    if step >= preset.steps and out_dir is not None:
        out = export_model(model, cfg, preset, tok_dir, out_dir, losses, device)
        log(f"wrote {out}")
    return {"losses": losses, "step": step, "out": out}
