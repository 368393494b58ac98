"""Decode at the real Kimi-Linear-48B width: a 4-layer stack (3 KDA + 1 MLA, all MoE), 4-bit, vs the bandwidth roofline.

    python benchmarks/stack.py                       # Q4_K everywhere it fits, batch 1, CPU
    python benchmarks/stack.py --format q8_0 --threads 1

The stack has the 48B config's widths (hidden 2304, 32 KDA heads x 128, MLA with kv_lora_rank 512, 256
routed experts of 1024 with top-8 and a shared expert) and 4 layers; the vocabulary is cut to 4,096 so the
head does not dominate.  Weights are random and quantized with kimiq's quantizers; to keep set-up short,
every expert of a projection holds the same quantized matrix (each in its own memory, so decode reads what
it would read from distinct experts).  Decode tok/s is measured with the compiled step (``DecodeStep``) and
eagerly.  The roofline: bytes of weights one decoded token reads (every dense linear, the router, the shared
expert and the 8 routed experts per layer, in the form the CPU kernel reads: the stored blocks, torch's int4
repack where a format runs torch's int4 kernel, and MLA's kv_b_proj dequantized in the model dtype, which the
absorbed decode reads) divided by the copy bandwidth measured in the same run (STREAM convention:
bytes read + written per second by ``dst.copy_(src)`` over 256 MiB, the same thread count).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kimiq.config import KIMI_LINEAR_48B_HF, ModelConfig
from kimiq.generate.fast import DecodeStep
from kimiq.model.model import KimiLinearForCausalLM
from kimiq.ops import qops
from kimiq.quant.formats import get_format
from kimiq.quant.modules import QuantExperts, QuantLinear, quantized_modules
from kimiq.quant.recipes import KEEP, PROTECTED_ROLES, fit_format, tensor_specs


def stack_config(layers: int = 4, vocab: int = 4096) -> ModelConfig:
    hf = dict(KIMI_LINEAR_48B_HF, num_hidden_layers=layers, vocab_size=vocab, first_k_dense_replace=0,
              bos_token_id=vocab - 3, eos_token_id=vocab - 2, pad_token_id=vocab - 1, dtype="bfloat16")
    kda = [i for i in range(1, layers)]  # 1-based: the last layer is MLA
    hf["linear_attn_config"] = dict(hf["linear_attn_config"], kda_layers=kda, full_attn_layers=[layers])
    return ModelConfig.from_hf(hf)


def build(cfg: ModelConfig, fmt: str, seed: int = 0) -> KimiLinearForCausalLM:
    """The stack on the meta device, its 2-D weights swapped for quantized random ones, the rest materialized."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    plan = {s.name: (fit_format(fmt, s.shape) if len(s.shape) == 2 and s.role not in PROTECTED_ROLES else KEEP)
            for s in tensor_specs(cfg)}
    plan["model.embed_tokens.weight"] = KEEP
    cache: dict[tuple, dict] = {}
    shapes = {s.name: s.shape for s in tensor_specs(cfg)}

    def parts(name: str, f: str) -> dict[str, torch.Tensor]:
        shape = shapes[name]
        key = (name.split(".experts.")[-1].split(".", 1)[-1], f, tuple(shape)) if ".experts." in name else None
        if key is not None and key in cache:
            return {k: v.clone() for k, v in cache[key].items()}  # same values, own memory
        w = torch.randn(shape, generator=gen) * 0.02
        p = get_format(f).quantize(w)
        if key is not None:
            cache[key] = p
        return p

    quantized_modules(model, plan, parts, torch.bfloat16)
    with torch.no_grad():
        for mod in model.modules():
            for leaf, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if not t.is_meta:
                    continue
                if leaf == "A_log":
                    v = torch.empty(t.shape).uniform_(1, 16, generator=gen).log()
                elif leaf == "dt_bias":
                    v = torch.full(t.shape, math.log(math.expm1(0.01)))
                elif leaf == "e_score_correction_bias" or t.dim() == 1:
                    v = torch.zeros(t.shape) if "bias" in leaf else torch.ones(t.shape)
                else:
                    v = torch.randn(t.shape, generator=gen) * 0.02
                new = v.to(torch.float32 if leaf in ("A_log", "dt_bias") or "gate" in leaf or "bias" in leaf
                           else torch.bfloat16)
                if isinstance(t, torch.nn.Parameter):
                    setattr(mod, leaf, torch.nn.Parameter(new, requires_grad=False))
                else:
                    mod.register_buffer(leaf, new)
    model.to_dtype(torch.bfloat16)
    return model.eval()


def prepare_kernels(model) -> None:
    """Build every lazy repack (int4 kernel packs per expert) so timing sees none of it."""
    with torch.inference_mode():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m(torch.zeros(1, m.in_features, dtype=torch.bfloat16))
            elif isinstance(m, QuantExperts):
                for proj, (n_out, n_in) in m.shapes.items():
                    x = torch.zeros(1, n_in, dtype=torch.bfloat16)
                    for e in range(m.num_experts):
                        m._matmul(x, proj, e)


def _kernel_bytes(parts_bytes: int, pack) -> int:
    if pack:  # (packed int4, group, bf16 scales_and_zeros)
        return pack[0].numel() * pack[0].element_size() + pack[2].numel() * pack[2].element_size()
    return parts_bytes


def bytes_per_token(model, k: int, cxx_experts: bool = False) -> tuple[int, int]:
    """(bytes the kernels read per decoded token, bytes of the stored format for the same weights).
    ``cxx_experts``: routed experts run kimiq's C++ operator on the stored blocks (the compiled step), not torch's
    int4 repack (eager)."""
    kernel = stored = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and not name.endswith("lm_head"):
            b = sum(t.numel() * t.element_size() for t in m._parts("q").values())
            stored += b
            if name.endswith("kv_b_proj"):  # MLA's absorbed decode reads its dequantized copy (model dtype)
                kernel += m.dequantized_weight().numel() * m.compute_dtype.itemsize
            else:
                kernel += _kernel_bytes(b, m._int4 or None)
        elif isinstance(m, QuantExperts):
            for proj in ("w1", "w3", "w2"):
                b = sum(t[0].numel() * t.element_size() for t in m._parts(proj).values())  # one expert
                stored += k * b
                kernel += k * _kernel_bytes(b, None if cxx_experts else m._int4.get((proj, 0)) or None)
        elif name.endswith("block_sparse_moe.gate"):
            b = m.weight.numel() * m.weight.element_size()
            stored += b
            kernel += b
    return kernel, stored


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * nbytes / best


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_tok_s(step, model, n: int, reps: int) -> list[float]:
    out = []
    for r in range(reps):
        state = model.new_state(1, capacity=16 + n + 1)
        model(torch.arange(16).view(1, 16) + 7, state, last_only=True)
        tok = torch.tensor([[11]])
        t0 = time.perf_counter()
        for _ in range(n):
            step(tok, state, last_only=True)
        out.append(n / (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="q4_k", help="weight format for every linear and expert (default q4_k)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gen", type=int, default=64, help="decode steps per repetition (default 64)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--mode", choices=DecodeStep.MODES, default="max-autotune", help="the compiled step's mode")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = stack_config(args.layers)
    t0 = time.perf_counter()
    model = build(cfg, args.format)
    prepare_kernels(model)
    setup = time.perf_counter() - t0
    steps = {"eager": model}
    if args.compile:
        steps["compiled"] = DecodeStep(model, mode=args.mode)
        print(f"decode step compiled (mode {args.mode}) in {steps['compiled'].warmup():.0f} s", flush=True)
    k = cfg.moe.num_experts_per_token
    cxx = qops.loaded() and not any(m._int4_wins() for m in model.modules() if isinstance(m, QuantExperts))
    per_mode = {mode: bytes_per_token(model, k, mode == "compiled" and cxx) for mode in steps}
    kernel, stored = per_mode["eager"]
    bw = copy_bandwidth()
    print(f"stack: {args.layers} layers at the 48B width ({cfg.moe.num_experts} experts, top-"
          f"{cfg.moe.num_experts_per_token}), {args.format}; threads {torch.get_num_threads()}; "
          f"built in {setup:.0f} s; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"weights stored, read per decoded token: {stored / 2**20:.1f} MiB; copy bandwidth {bw / 1e9:.1f} GB/s")
    print("\n| decode | tok/s | ms/token | MiB read per token (kernels' form) | roofline tok/s | of roofline |\n"
          "|---|---:|---:|---:|---:|---:|")
    for mode, step in steps.items():
        r = decode_tok_s(step, model, args.gen, args.reps)
        tps = statistics.median(r)
        kernel = per_mode[mode][0]
        print(f"| {mode} | {tps:.2f} ± {(max(r) - min(r)) / 2:.2f} | {1000 / tps:.1f} | {kernel / 2**20:.1f} | "
              f"{bw / kernel:.1f} | {100 * tps * kernel / bw:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
