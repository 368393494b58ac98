"""Decode cost against context length: ms/token at 1k ... 128k tokens of context, batch 1, CPU.

    python benchmarks/long_context.py                         # the embedded model, fp32, eager and compiled
    python benchmarks/long_context.py --contexts 1024 131072 --dtype bf16 --threads 1
    python benchmarks/long_context.py --cache-dtype bf16     # fp32 model, bf16 latent cache (as llama.cpp's f16)

KDA layers carry a constant-size state; MLA layers attend over a latent cache of (kv_lora_rank + rope)
values per token, so decode reads ``mla_layers x context x (R + rope) x bytes`` of cache per token on top
of the weights.  The state "after N tokens" is built as follows, because prefilling 128k tokens on 2 cores
takes many minutes and decode cost does not depend on what the cache holds: a real prefill of the first
``--prefill`` tokens, whose MLA latents are then tiled to fill N slots and ``lengths`` set to N (the KDA
state is the real one).  The table shows median ms/token over ``--gen`` steps x ``--reps``, the ratio to
the shortest context, the cache bytes per token read, the time that read takes at the read bandwidth measured
in the same run (a sum over 256 MiB, best of 5, same threads), the step "bound" = shortest-context step + that
read time (what an engine that only adds the cache read to the short-context step would take) and the ratio
to it, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from kimiq import default_model_path
from kimiq.generate.fast import DecodeStep
from kimiq.model.state import MLAState
from kimiq.model.weights import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.inference_mode()
def state_at(model, context: int, prefill: torch.Tensor, extra: int):
    """A state whose rows have ``context`` tokens: prefill, then tile the MLA latents up to ``context``."""
    state = model.new_state(1, capacity=context + extra)
    model(prefill, state, last_only=True)
    n = prefill.shape[1]
    for s in state.layers:
        if isinstance(s, MLAState):
            reps = -(-context // n)
            s.latent[:, :context] = s.latent[:, :n].repeat(1, reps, 1)[:, :context]
    state.lengths.fill_(context)
    return state


def read_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Bytes per second one pass of reading memory takes (torch.sum over a tensor far larger than the caches)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


@torch.inference_mode()
def decode_ms(step, state, gen: int, reps: int) -> list[float]:
    tok = torch.tensor([[7]])
    out, base = [], state.snapshot()
    for _ in range(reps):
        state.restore(base)
        t0 = time.perf_counter()
        for _ in range(gen):
            tok = step(tok, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out.append(1000 * (time.perf_counter() - t0) / gen)
    state.restore(base)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--cache-dtype", choices=sorted(DTYPES), default=None,
                    help="MLA latent cache dtype (default: the model dtype)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    ap.add_argument("--prefill", type=int, default=1024, help="real prefill tokens before tiling (default 1024)")
    ap.add_argument("--gen", type=int, default=32, help="decode steps per repetition (default 32)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--mode", choices=DecodeStep.MODES, default="max-autotune", help="the compiled step's mode")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    model = load_model(path, dtype=DTYPES[args.dtype]).eval()
    model.cache_dtype = DTYPES[args.cache_dtype] if args.cache_dtype else None
    cfg = model.config
    caches = [s.latent for s in model.new_state(1).layers if isinstance(s, MLAState)]
    n_mla, cache_dtype = len(caches), caches[0].dtype
    per_tok = n_mla * cfg.mla.latent_dim * cache_dtype.itemsize
    prompt = torch.randint(0, cfg.vocab_size - 300, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    steps = {"eager": model}
    if "compiled" in args.modes:
        steps["compiled"] = DecodeStep(model, mode=args.mode)
    steps = {k: v for k, v in steps.items() if k in args.modes}
    if "compiled" in steps:
        steps["compiled"].warmup()
    bw = read_bandwidth()
    print(f"model {path}; {args.dtype}, cache {str(cache_dtype).removeprefix('torch.')}; "
          f"threads {torch.get_num_threads()}; {n_mla} MLA layers x "
          f"{cfg.mla.latent_dim} cached values = {per_tok} B of cache per token of context; "
          f"{args.gen} steps x {args.reps} reps; read bandwidth {bw / 1e9:.1f} GB/s; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("\n| context | mode | decode ms/token | vs first context | cache read per token | read time | bound "
          "(first + read) | vs bound | peak RSS |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    first: dict[str, float] = {}
    for ctx in args.contexts:
        state = state_at(model, ctx, prompt, args.gen + 1)
        for mode, step in steps.items():
            ms = statistics.median(decode_ms(step, state, args.gen, args.reps))
            read_ms = 1000 * ctx * per_tok / bw
            first.setdefault(mode, ms)
            bound = first[mode] + read_ms
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"| {ctx:,} | {mode} | {ms:.2f} | {ms / first[mode]:.2f}x | {ctx * per_tok / 2**20:.1f} MiB | "
                  f"{read_ms:.2f} | {bound:.2f} | {ms / bound:.2f}x | {rss:.0f} MiB |", flush=True)
        del state


if __name__ == "__main__":
    main()
