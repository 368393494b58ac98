"""Prefill and decode throughput of kimiq on one model, batch 1.

    python benchmarks/decode.py --model DIR [--dtype bf16] [--prompt 512] [--gen 64] [--reps 3]
    python benchmarks/decode.py --random tiny          # a random model of the tiny test config

Prints prefill tok/s (one forward over ``--prompt`` tokens into a fresh state) and decode
tok/s (``--gen`` single-token steps after it), median and spread over ``--reps`` runs, plus
the weights' size and the effective weight bandwidth of decode.  Peer comparisons
(llama.cpp, transformers) live in ``benchmarks/peers.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kimiq.config import ModelConfig
from kimiq.model.model import KimiLinearForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args) -> KimiLinearForCausalLM:
    if args.model:
        from kimiq.model.weights import load_model

        return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    cfg = ModelConfig.tiny()
    return KimiLinearForCausalLM(cfg).init_weights(0).to_dtype(DTYPES[args.dtype]).to(args.device).eval()


@torch.inference_mode()
def run_once(model, prompt: torch.Tensor, n_gen: int) -> tuple[float, float]:
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    state = model.new_state(1, capacity=prompt.shape[1] + n_gen)
    sync()
    t0 = time.perf_counter()
    logits = model(prompt, state, last_only=True)
    sync()
    t1 = time.perf_counter()
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_gen):
        tok = model(tok, state, last_only=True)[:, -1].argmax(-1, keepdim=True)
    sync()
    t2 = time.perf_counter()
    return prompt.shape[1] / (t1 - t0), n_gen / (t2 - t1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (HF layout)")
    ap.add_argument("--random", choices=["tiny"], help="use a random model of a built-in config instead")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=512, help="prefill length (tokens)")
    ap.add_argument("--gen", type=int, default=64, help="decode steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if not args.model and not args.random:
        from kimiq import default_model_path

        if (default_model_path() / "config.json").exists():
            args.model = str(default_model_path())
        else:
            ap.error("give --model DIR or --random tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    run_once(model, prompt[:, :16], 4)  # warm-up
    pre, dec = zip(*(run_once(model, prompt, args.gen) for _ in range(args.reps)))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spread = lambda xs: (max(xs) - min(xs)) / 2  # noqa: E731
    print(f"model: {args.model or 'random ' + args.random}  dtype={args.dtype}  device={args.device}  "
          f"threads={torch.get_num_threads()}  weights={nbytes / 2**20:.1f} MiB")
    print(f"prefill ({args.prompt} tok): {statistics.median(pre):10.1f} tok/s  (± {spread(pre):.1f})")
    print(f"decode  ({args.gen} tok):  {statistics.median(dec):10.1f} tok/s  (± {spread(dec):.1f})")


if __name__ == "__main__":
    main()
