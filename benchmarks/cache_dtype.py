"""fp32 vs bf16 MLA latent cache for an fp32 model: decode ms/token side by side, in one process.

    python benchmarks/cache_dtype.py --threads 1                        # 1k and 128k, compile mode default
    python benchmarks/cache_dtype.py --mode max-autotune --contexts 1024 32768 131072

One model, one compiled decode step (it builds one graph per cache dtype), a state per cache dtype and context
built as in long_context.py (a real prefill whose MLA latents are tiled up to the context), then ``--reps``
interleaved repetitions of ``--gen`` steps per state; the table shows the median ms/token (first repetition
dropped).  Interleaving in one process keeps the compiled step's kernel picks and any background load the same
for both cache dtypes, which separate long_context.py runs do not (max-autotune picks kernels by timing them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kimiq import default_model_path
from kimiq.generate.fast import DecodeStep
from kimiq.model.weights import load_model

from long_context import DTYPES, state_at  # benchmarks/, the script's directory, is on sys.path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 131072])
    ap.add_argument("--prefill", type=int, default=1024, help="real prefill tokens before tiling (default 1024)")
    ap.add_argument("--gen", type=int, default=24, help="decode steps per repetition (default 24)")
    ap.add_argument("--reps", type=int, default=4, help="interleaved repetitions, the first dropped (default 4)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--mode", choices=DecodeStep.MODES, default="default", help="the compiled step's mode")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model or str(default_model_path()), dtype=torch.float32).eval()
    step = DecodeStep(model, mode=args.mode)
    step.warmup()
    V = model.config.vocab_size
    prompt = torch.randint(0, V - 300, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    print(f"fp32 model; threads {torch.get_num_threads()}; compiled ({args.mode}); {args.gen} steps x {args.reps} "
          f"interleaved reps; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| context | fp32 cache ms/token | bf16 cache ms/token | bf16 / fp32 |\n|---:|---:|---:|---:|")
    for ctx in args.contexts:
        states = {}
        for name, dt in DTYPES.items():
            model.cache_dtype = dt
            states[name] = state_at(model, ctx, prompt, args.gen + 1)
        model.cache_dtype = None
        ms: dict[str, list[float]] = {name: [] for name in states}
        with torch.inference_mode():
            for _ in range(args.reps):
                for name, st in states.items():
                    snap, tok = st.snapshot(), torch.tensor([[7]])
                    t0 = time.perf_counter()
                    for _ in range(args.gen):
                        tok = step(tok, st)[:, -1].argmax(-1, keepdim=True)
                    ms[name].append(1000 * (time.perf_counter() - t0) / args.gen)
                    st.restore(snap)
        a, b = (statistics.median(ms[n][1:] or ms[n]) for n in ("fp32", "bf16"))
        print(f"| {ctx:,} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
        del states


if __name__ == "__main__":
    main()
