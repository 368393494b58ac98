"""CPU decode and prefill of quantized builds side by side: bf16 vs Q8_0 vs Q4_K_M vs MXFP4, batch 1.

    python benchmarks/quant_decode.py                        # the embedded default model
    python benchmarks/quant_decode.py --model DIR --builds bf16 q8_0 q4_k_m mxfp4_moe --reps 5

Each build is the model loaded in bf16 and quantized in memory with a built-in recipe
(``kimiq.quant.quantize``: the same bytes ``kimiq quantize`` writes); activations are bf16 in every
build, so the rows differ only in how the weights are stored and multiplied.  Repetitions are
interleaved (build A, B, C, A, B, C, ...) so a noisy neighbour hits every build alike; the table
shows median tok/s, the spread (max - min) / 2, the weights' bytes, and decode relative to bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import run_once  # noqa: E402

from kimiq import default_model_path  # noqa: E402
from kimiq.model.weights import load_model  # noqa: E402
from kimiq.ops import qops  # noqa: E402
from kimiq.quant.modules import quantize  # noqa: E402


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and packed buffers (what decode reads); excludes kernel-side repacks."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                   if name.rsplit(".", 1)[-1].startswith(("q_", "w1_", "w2_", "w3_")))


def build(path: str, name: str) -> torch.nn.Module:
    dtype = torch.float32 if name == "fp32" else torch.bfloat16
    model = load_model(path, dtype=dtype).eval()
    if name not in ("fp32", "bf16"):
        quantize(model, name)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--builds", nargs="+", default=["bf16", "q8_0", "q4_k_m", "mxfp4_moe"],
                    help="fp32, bf16 or recipe names (default: bf16 q8_0 q4_k_m mxfp4_moe)")
    ap.add_argument("--prompt", type=int, default=128, help="prefill length (tokens)")
    ap.add_argument("--gen", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    models = {b: build(path, b) for b in args.builds}
    qops.available()  # kimiq's C++ operators, which generate_tokens loads on CPU
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    for m in models.values():
        run_once(m, prompt[:, :16], 4)  # warm-up: kernels built, int4 repacks made
    pre: dict[str, list[float]] = {b: [] for b in models}
    dec: dict[str, list[float]] = {b: [] for b in models}
    for _ in range(args.reps):
        for b, m in models.items():
            p, d = run_once(m, prompt, args.gen)
            pre[b].append(p)
            dec[b].append(d)
    print(f"model: {path}\nCPU threads={torch.get_num_threads()}, batch 1, prompt {args.prompt}, decode {args.gen} "
          f"x {args.reps} reps (interleaved), {time.strftime('%Y-%m-%d')}")
    ref = statistics.median(dec["bf16"]) if "bf16" in dec else None
    print("| build | weights MiB | prefill tok/s | decode tok/s | decode vs bf16 |\n|---|---:|---:|---:|---:|")
    for b, m in models.items():
        med = statistics.median(dec[b])
        rel = f"{med / ref:.2f}x" if ref else "-"
        print(f"| {b} | {weight_bytes(m) / 2**20:.1f} | {statistics.median(pre[b]):.0f} "
              f"± {(max(pre[b]) - min(pre[b])) / 2:.0f} | {med:.1f} ± {(max(dec[b]) - min(dec[b])) / 2:.1f} | {rel} |")


if __name__ == "__main__":
    main()
