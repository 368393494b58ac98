"""kimiq next to llama.cpp and transformers on the same checkpoint: prefill and decode tok/s, batch 1, CPU.

    python benchmarks/peers.py                          # the embedded default model, every precision
    python benchmarks/peers.py --precisions fp32 q4_k_m --reps 5 --prompt 512 --gen 64

Per precision the same weights go to every engine: llama.cpp reads kimiq's GGUF export (``kimiq export
--gguf``; for q4_k_m / mxfp4_moe the very blocks kimiq runs), transformers loads the checkpoint directory
(fp32 / bf16 only: it has no GGUF path for this architecture).  kimiq runs fp32 / bf16 as its model dtype and
the quantized precisions with ``--quant-dtype`` activations (fp32 by default, as llama.cpp and as ``kimiq
generate`` picks for a small model on CPU; until 2026-12-03 they ran with bf16 activations, which only CPUs with
AVX512-BF16 compute quickly).  Each repetition runs a prefill of
``--prompt`` tokens into a fresh state, then ``--gen`` single-token decode steps (the same fixed token
ids in every engine, no sampling); kimiq prefills with the compiled KDA chunk step and decodes with its
compiled step (``DecodeStep``, ``--mode max-autotune`` by default; the compile time is printed) unless
``--no-compile``.  Repetitions are interleaved across engines so
background load hits all alike; the table shows the median, the spread (max - min) / 2 and kimiq / peer
ratios.

llama.cpp comes from llama-cpp-python (``pip install llama-cpp-python==0.3.36``, built from source: it
has no wheel); without it, or without transformers, those columns are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kimiq import default_model_path
from kimiq.generate.fast import DecodeStep
from kimiq.model.weights import load_model
from kimiq.quant.modules import quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16", "q8_0": "q8_0", "q4_k_m": "q4_k_m", "mxfp4_moe": "mxfp4_moe"}


class Kimiq:
    name = "kimiq"

    def __init__(self, path: str, precision: str, compile: bool = True, mode: str = "max-autotune",
                 quant_dtype: torch.dtype = torch.float32):
        # fp32 / bf16: the model dtype; quantized: the activation (model) dtype around the quantized weights
        dtype = DTYPES.get(precision, quant_dtype)
        # compiled: the KDA chunk step for prefill (kda_impl="compile") and the whole decode step, both built on
        # the warm-up run
        self.model = load_model(path, dtype=dtype, kda_impl="compile" if compile else "torch").eval()
        if precision not in ("fp32", "bf16"):
            quantize(self.model, precision)
        self.step = DecodeStep(self.model, mode=mode) if compile else self.model
        self.compile_s = self.step.warmup() if compile else 0.0

    @torch.inference_mode()
    def run(self, prompt: list[int], gen: list[int]) -> tuple[float, float]:
        state = self.model.new_state(1, capacity=len(prompt) + len(gen))
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        self.model(ids, state, last_only=True)
        t1 = time.perf_counter()
        for t in gen:
            self.step(torch.tensor([[t]]), state, last_only=True)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: str, precision: str, ctx: int, threads: int, workdir: Path):
        import llama_cpp

        from kimiq.export.gguf import export_gguf

        gguf = export_gguf(path, workdir / f"{precision}.gguf", outtype=GGUF_TYPE[precision], log=lambda s: None)
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512),
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, prompt: list[int], gen: list[int]) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        for t in gen:
            self.llm.eval([t])
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


class Transformers:
    name = "transformers"

    def __init__(self, path: str, precision: str):
        from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.model = KimiLinearForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.inference_mode()
    def run(self, prompt: list[int], gen: list[int]) -> tuple[float, float]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        t0 = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        for t in gen:
            out = self.model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


def _engines(path: str, precision: str, args, workdir: Path) -> list:
    out = [Kimiq(path, precision, args.compile, args.mode, DTYPES[args.quant_dtype])]
    if args.compile:
        print(f"  kimiq {precision}: decode step compiled (mode {args.mode}) in {out[0].compile_s:.0f} s", flush=True)
    try:
        out.append(LlamaCpp(path, precision, args.prompt + args.gen + 8, torch.get_num_threads(), workdir))
    except ImportError:
        print("  (llama_cpp not installed: llama.cpp skipped)")
    if precision in ("fp32", "bf16"):
        try:
            out.append(Transformers(path, precision))
        except ImportError:
            print("  (transformers not installed: skipped)")
    return out


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):9.1f} ± {(max(xs) - min(xs)) / 2:6.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--precisions", nargs="+", default=list(GGUF_TYPE), choices=list(GGUF_TYPE))
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens (default 512)")
    ap.add_argument("--gen", type=int, default=64, help="decode steps (default 64)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (default: torch's count)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="kimiq runs eagerly instead of with "
                    "the compiled KDA chunk step (prefill) and decode step (kimiq.generate.fast)")
    ap.add_argument("--mode", choices=DecodeStep.MODES, default="max-autotune", help="the decode step's compile "
                    "mode (default max-autotune: C++ GEMM templates and wrapper, ~1 min to compile per precision)")
    ap.add_argument("--quant-dtype", choices=sorted(DTYPES), default="fp32", help="kimiq's activation dtype for the "
                    "quantized precisions (default fp32: what 'kimiq generate' picks for a small model on CPU, and "
                    "llama.cpp's activations; bf16 needs AVX512-BF16 to be fast)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    cfg_vocab = load_model(path, dtype=torch.float32).config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg_vocab - 300, (args.prompt + args.gen,), generator=g).tolist()  # below the specials
    prompt, gen = ids[: args.prompt], ids[args.prompt:]
    mode = f"compiled ({args.mode})" if args.compile else "eager"
    print(f"model {path}; CPU threads {torch.get_num_threads()}; kimiq decode {mode}, quantized precisions with "
          f"{args.quant_dtype} activations; "
          f"prompt {args.prompt}, decode {args.gen}, "
          f"{args.reps} interleaved reps; {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            engines = _engines(path, precision, args, Path(tmp))
            for e in engines:
                e.run(prompt[:32], gen[:4])  # warm-up (kernels built, caches allocated)
            res = {e.name: ([], []) for e in engines}
            for _ in range(args.reps):
                for e in engines:
                    p, d = e.run(prompt, gen)
                    res[e.name][0].append(p)
                    res[e.name][1].append(d)
            rows.append((precision, res))
            del engines
    print(f"\n| precision | engine | prefill {args.prompt} tok/s | decode tok/s | kimiq/peer prefill | "
          f"kimiq/peer decode |\n|---|---|---:|---:|---:|---:|")
    for precision, res in rows:
        kp, kd = (statistics.median(x) for x in res["kimiq"])
        for name, (p, d) in res.items():
            rp = "" if name == "kimiq" else f"{kp / statistics.median(p):.2f}"
            rd = "" if name == "kimiq" else f"{kd / statistics.median(d):.2f}"
            print(f"| {precision} | {name} | {_fmt(p)} | {_fmt(d)} | {rp} | {rd} |")


if __name__ == "__main__":
    main()
