"""The ``kimiq`` command: one console script, one subcommand per job.

    kimiq generate [-m DIR] -p "def fibonacci(n):"     continue a prompt (streamed; tok/s at the end)
    kimiq chat     [-m DIR] [-p "one-shot question"]   multi-turn chat; the model state is kept across turns
    kimiq verify   DIR                                  SHA256SUMS + tensor inventory against config.json
    kimiq train    --preset default                     rebuild the embedded default model (seeded, resumable)
    kimiq eval bpb [-m DIR]                             held-out bits per byte next to xz -9e
    kimiq eval ppl [-m DIR] [--ctx 512]                 perplexity +- SE over ctx windows (llama.cpp's second half)
    kimiq eval kld --base DIR | --base-logits FILE      KL divergence, PPL ratio, flips of a model against a base
    kimiq eval compare DIR... [--md F --csv F --plot F] size, bpw, PPL, KLD of several builds
    kimiq quantize [-m DIR] -r q4_k_m -o OUT            quantize a checkpoint (--list: the recipes)
    kimiq quantize [-m DIR] --target-bpw 4.9 -o OUT     ... with formats chosen by measured sensitivity
    kimiq export   [-m DIR] --gguf OUT.gguf | --mlx DIR  write a GGUF for llama.cpp, or an mlx-lm directory
    kimiq plan     [-m DIR|48b] --memory 24GB [-r R]     memory planner: longest context / rows for a budget
    kimiq imatrix  [-m DIR] -o imatrix.safetensors      importance matrix for quantize --imatrix (llama-imatrix)

Without ``--model`` the embedded default model is used.  Each subcommand has ``add_args(p)``
and ``run(args)``; this module only wires them up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["main"]

DTYPES = ("auto", "fp32", "bf16", "fp16")


def _torch_dtype(name: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------- shared options
def _add_model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("model")
    if model:
        g.add_argument("-m", "--model", metavar="DIR", help="checkpoint directory in Hugging Face layout "
                       "(config.json, safetensors shards + index, tiktoken.model); default: the embedded model")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype; auto = fp32 on CPU for small models, else the checkpoint's (default: auto)")
    g.add_argument("--cache-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="MLA latent cache dtype; auto = the model dtype.  bf16 with an fp32 model halves the cache "
                   "(as llama.cpp's f16 KV cache) and speeds decode at long context (default: auto)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--kda-impl", choices=("torch", "compile", "naive", "fla"), default="torch",
                   help="KDA kernel: torch (chunked/recurrent, any device), compile (the same, chunk step compiled "
                   "by inductor: ~1.2x prefill on CPU; --compile picks it), naive (reference loop), "
                   "fla (Triton, CUDA only; pip install 'kimiq[kernels]')")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "max-autotune"),
                   metavar="MODE", help="decode with the torch.compile'd step (kimiq.generate.fast) and prefill with "
                   "the compiled KDA chunk step: ~2x faster per token on CPU after a one-off compile of tens of "
                   "seconds (cached on disk for later runs); worth it for long generations.  --compile max-autotune: "
                   "~1.6x faster again (inductor's C++ GEMM templates, C++ wrapper), compiled anew in every run "
                   "(25-75 s on 2 cores)")


def _decode_step(args, model):
    mode = getattr(args, "compile", None)
    if not mode:
        return None
    from kimiq.generate.fast import DecodeStep

    import warnings

    # torch's own autotuner trips its TypedStorage deprecation warning; nothing for the user to act on
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    step = DecodeStep(model, mode=mode)
    print(f"compiling the decode step (torch.compile, mode {mode}) ...", file=sys.stderr, flush=True)
    print(f"compiled in {step.warmup():.1f} s", file=sys.stderr)
    return step


def _add_sampling_args(p: argparse.ArgumentParser, default_max: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=default_max,
                   help=f"tokens to generate (default: {default_max})")
    g.add_argument("-t", "--temperature", "--temp", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top) (default: 0 = off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default: 1.0 = off)")
    g.add_argument("--repeat-window", type=int, default=64, help="tokens the penalty looks back over (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="RNG seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")


def _load(args):
    import torch

    from kimiq import default_model_path, load

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    dtype = _torch_dtype(args.dtype)
    if dtype is None and str(args.device).startswith("cpu"):
        dtype = torch.float32 if _small(path) else torch.bfloat16
    impl = "compile" if getattr(args, "compile", False) and args.kda_impl == "torch" else args.kda_impl
    model, tok = load(path, dtype=dtype, device=args.device, kda_impl=impl)
    model.cache_dtype = _torch_dtype(getattr(args, "cache_dtype", "auto"))
    return model, tok


def _small(path) -> bool:
    """fp32 on CPU is the fast, exact choice for models whose fp32 weights fit easily (< 4 GiB)."""
    from pathlib import Path

    total = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return total < 2 * 2**30


def _params(args):
    from kimiq.generate import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        repetition_window=args.repeat_window,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as one user turn with the model's chat template")
    p.add_argument("--allow-special", action="store_true",
                   help="let special-token text in the prompt (e.g. <|im_end|>) become control tokens")
    _add_model_args(p)
    _add_compile_arg(p)
    _add_sampling_args(p, 256)


def _generate(args) -> int:
    from kimiq.generate import GenerationResult, generate_text

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    model, tok = _load(args)
    params = _params(args)
    if args.chat_template:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        source: object = prompt_ids
    else:
        sys.stdout.write(prompt)
        source = prompt
    result = GenerationResult()
    for chunk in generate_text(model, tok, source, params, args.max_tokens, args.stop,
                               allow_special=args.allow_special, result=result, decode=_decode_step(args, model)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{result.stats.summary()}; finish: {result.finish_reason}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- chat
def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", action="append", default=[],
                   help="a user turn to send non-interactively (repeatable); without it, read turns from the terminal")
    p.add_argument("-s", "--system", default=None, help="system message (default: the template's)")
    p.add_argument("--stats", action="store_true", help="print tok/s after every reply")
    _add_model_args(p)
    _add_compile_arg(p)
    _add_sampling_args(p, 1024)


def _chat(args) -> int:
    from kimiq.generate import ChatSession

    model, tok = _load(args)
    session = ChatSession(model, tok, system=args.system, params=_params(args),
                          max_new_tokens=args.max_tokens, stop_strings=args.stop, decode=_decode_step(args, model))

    def turn(text: str) -> None:
        for chunk in session.send(text):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats or args.prompt:
            print(f"[{session.last.stats.summary()}]", file=sys.stderr)

    if args.prompt:
        for text in args.prompt:
            print(f">>> {text}")
            turn(text)
        return 0
    print("kimiq chat — empty line or Ctrl-D to quit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text.strip():
            return 0
        if text.strip() == "/reset":
            session.reset()
            continue
        turn(text)


# ---------------------------------------------------------------------------------------------- verify
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="checkpoint directory")


def _verify(args) -> int:
    from kimiq.model.weights import verify_checkpoint

    report = verify_checkpoint(args.dir)
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="default (the embedded model, ~90 min on 2 CPU cores) or "
                   "smoke (a seconds-long run of the same pipeline)")
    p.add_argument("--work-dir", default=None, help="tokenizer, token caches, ckpt.pt and log.jsonl "
                   "(default: runs/PRESET); re-running resumes from what is there")
    p.add_argument("--out", default=None, help="where the finished model is written in HF layout "
                   "(default: WORK_DIR/model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=None, help="stop at this step (schedule unchanged; no export "
                   "unless the preset's last step is reached)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--amp", choices=("bf16", "fp32"), default=None, help="override the preset's matmul precision "
                   "(default preset: bf16 autocast; use fp32 on CPUs without AVX512-BF16/AMX, where bf16 is slow)")
    p.add_argument("--kda-impl", choices=("torch", "compile"), default=None, help="override the preset's KDA "
                   "implementation (default preset: compile, which needs a C++ compiler for inductor)")


def _train(args) -> int:
    import torch

    from kimiq.train.trainer import PRESETS, run_training

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work_dir or f"runs/{args.preset}"
    out = args.out or f"{work}/model"
    preset = PRESETS[args.preset]
    if args.amp is not None:
        preset = dataclasses.replace(preset, amp=None if args.amp == "fp32" else args.amp)
    if args.kda_impl is not None:
        preset = dataclasses.replace(preset, kda_impl=args.kda_impl)
    res = run_training(preset, work, out, device=args.device, steps=args.steps)
    print(f"step {res['step']}: first losses {[round(x, 4) for x in res['losses'][:3]]}, "
          f"last {round(res['losses'][-1], 4) if res['losses'] else None}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    b = sub.add_parser("bpb", help="bits per byte on held-out stdlib files, next to xz -9e on the same bytes",
                       description="Bits per byte of a model on a split of the running Python's stdlib sources "
                       "(the default model's held-out data), with xz -9e's on the same files.")
    b.add_argument("--split", choices=("test", "validation", "train"), default="test")
    b.add_argument("--limit", type=int, default=None, help="only the first N files of the split")
    b.add_argument("--window", type=int, default=512, help="tokens per forward; state carries across (default 512)")
    b.add_argument("--max-context", type=int, default=None, help="fresh state every N tokens (default: the whole "
                   "file is context)")
    _add_model_args(b)
    p_ = sub.add_parser("ppl", help="perplexity +- SE over non-overlapping ctx-token windows (llama-perplexity)",
                        description="Perplexity over non-overlapping windows of --ctx tokens, each from a fresh "
                        "state; by default only the second half of each window is scored, as llama-perplexity.")
    _add_window_args(p_)
    _add_model_args(p_)
    k = sub.add_parser("kld", help="KL(base || model), PPL ratio, Δp and top-1 flips against a base model",
                       description="KL divergence of --model against a base on the same windows: exact with "
                       "--base DIR (both models run), or against a file saved by --save-base-logits.")
    g = k.add_mutually_exclusive_group(required=True)
    g.add_argument("--base", metavar="DIR", help="base checkpoint (full-vocabulary KL)")
    g.add_argument("--base-logits", metavar="FILE", help="base summary saved by --save-base-logits; its tokens "
                   "and windows are used (window options, if given, must match)")
    k.add_argument("--save-base-logits", metavar="FILE",
                   help="with --base: also save the base's log-probs (see --top-k)")
    k.add_argument("--top-k", type=int, default=0, help="log-probs per position kept by --save-base-logits: "
                   "0 = the full vocabulary (exact KL; default), K = the top K + the rest as one bucket (smaller "
                   "file, KL a lower bound)")
    k.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    _add_window_args(k)
    _add_model_args(k)
    c = sub.add_parser("compare", help="size, bits per weight, PPL and KLD of several builds; md/csv/png",
                       description="Run every build over the same windows: size on disk, bits per weight, "
                       "PPL +- SE, mean KLD and top-1 flip rate against the base (default: the first DIR).")
    c.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directories (full precision or quantized)")
    c.add_argument("--base", metavar="DIR", help="reference build for KLD (default: the first DIR)")
    c.add_argument("--top-k", type=int, default=0, help="keep only the base's top-k log-probs in memory "
                   "(default 0: the full vocabulary, exact KL, positions x vocab x 4 bytes)")
    c.add_argument("--md", metavar="FILE", help="write the markdown table")
    c.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    c.add_argument("--plot", metavar="PNG", help="plot mean KLD (log) vs size with the Pareto front (matplotlib)")
    _add_window_args(c)
    _add_model_args(c, model=False)


def _add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and windows")
    g.add_argument("--data", metavar="FILE", help="a text file, scored as one [EOS]-prefixed document (default: "
                   "the default model's held-out split, stdlib test files)")
    g.add_argument("--ctx", type=int, default=None, help="tokens per window (default 512)")
    g.add_argument("--limit-tokens", type=int, default=None, metavar="N", help="use only the first N tokens")
    g.add_argument("--score", choices=("second-half", "all"), default=None, help="score the second half of each "
                   "window (llama.cpp; default) or every position but the first (mlx-lm)")


def _window_tokens(args, tok):
    from pathlib import Path

    from kimiq.eval.ppl import Windows, heldout_tokens, token_stream

    if args.data:
        tokens = token_stream(tok, [Path(args.data).read_text(encoding="utf-8")])
    else:
        tokens = heldout_tokens(tok, args.limit_tokens)
    return tokens, Windows.over(len(tokens), args.ctx or 512, args.score or "second-half", args.limit_tokens)


def _bar(desc: str, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, unit="window")

    def tick(_window: int) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return tick


def _eval(args) -> int:
    return {"bpb": _eval_bpb, "ppl": _eval_ppl, "kld": _eval_kld, "compare": _eval_compare}[args.metric](args)


def _eval_ppl(args) -> int:
    from kimiq.eval.ppl import perplexity

    model, tok = _load(args)
    tokens, w = _window_tokens(args, tok)
    res = perplexity(model, tok, tokens[: w.n_tokens], ctx=w.ctx, score=w.score, progress=_bar("ppl", w.n))
    print(res.report)
    return 0


def _eval_kld(args) -> int:
    import json

    from kimiq.eval.kld import BaseLogits, kld_vs_model, kld_vs_saved

    model, tok = _load(args)
    if args.base_logits:
        if args.save_base_logits:
            raise ValueError("--save-base-logits needs --base DIR")
        base = BaseLogits.load(args.base_logits)
        if args.data or args.ctx or args.score or args.limit_tokens:  # check the data; unset options: the file's
            w = base.windows
            given = argparse.Namespace(**{**vars(args), "ctx": args.ctx or w.ctx, "score": args.score or w.score,
                                          "limit_tokens": args.limit_tokens or w.n_tokens})
            base.check(*_window_tokens(given, tok), n_vocab=model.config.vocab_size)
        res = kld_vs_saved(model, base, progress=_bar("kld", base.windows.n))
        kept = "full distributions" if base.ids is None else f"top-{base.k} of {base.n_vocab} + rest"
        print(f"base: {base.source or args.base_logits} ({kept})")
    else:
        tokens, w = _window_tokens(args, tok)
        # the base is the reference: --cache-dtype applies to the model measured, not to it
        base_model, _ = _load(argparse.Namespace(**{**vars(args), "model": args.base, "cache_dtype": "auto"}))
        k = args.top_k if args.save_base_logits else None
        res = kld_vs_model(model, base_model, tokens, w, save_k=k, source=args.base, progress=_bar("kld", w.n))
        if args.save_base_logits:
            res.base.save(args.save_base_logits)
            print(f"saved base logits to {args.save_base_logits}", file=sys.stderr)
    print(res.report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.report.to_dict(), f, indent=2)
    return 0


def _eval_compare(args) -> int:
    from pathlib import Path

    from kimiq.eval.compare import compare_builds, markdown, plot, write_csv

    rows = compare_builds(args.dirs, lambda path: _load(argparse.Namespace(**{**vars(args), "model": path})),
                          base=args.base, tokens_for=lambda tok: _window_tokens(args, tok)[0], ctx=args.ctx or 512,
                          score=args.score or "second-half", limit_tokens=args.limit_tokens, top_k=args.top_k,
                          progress=_bar)
    table = markdown(rows)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot)
    return 0


def _eval_bpb(args) -> int:
    import platform

    from kimiq.eval.bpb import heldout_bpb
    from kimiq.train.data import read_source, split_files

    model, tok = _load(args)
    files = [(r, t) for r, f in split_files(args.split, limit=args.limit) if (t := read_source(f)) is not None]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc=f"bpb {args.split}", dynamic_ncols=True)
    report = heldout_bpb(model, tok, files, window=args.window, max_context=args.max_context,
                         progress=lambda _: bar.update(1))
    bar.close()
    print(f"stdlib {args.split} split, Python {platform.python_version()}: {report}")
    return 0


# ---------------------------------------------------------------------------------------------- quantize
def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="DIR", help="full-precision checkpoint (default: the embedded model)")
    p.add_argument("-r", "--recipe", metavar="NAME|FILE", help="a built-in recipe (see --list) or a JSON recipe "
                   'file {"default": FORMAT, "rules": [{"match": REGEX, "format": FORMAT}, ...]}')
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (safetensors: checkpoint tensor name -> "
                   "[in] mean squared activation per input column); used by the k-quants, Q4_0, Q5_0/1")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--list", action="store_true", help="print the built-in recipes with bits per weight (on the "
                   "chosen model) and the formats, then exit")
    a = p.add_argument_group("sensitivity-graded recipe (instead of --recipe; kimiq.quant.sensitivity)")
    t = a.add_mutually_exclusive_group()
    t.add_argument("--target-bpw", type=float, metavar="B", help="measure each weight group's KL cost per format on "
                   "calibration text, then pick the formats of least predicted KL at B bits per weight (all tensors)")
    t.add_argument("--target-size", type=float, metavar="GB", help="as --target-bpw, for a size in GB (10^9 bytes)")
    a.add_argument("--family", choices=("gguf", "mlx", "all"), default="gguf", help="candidate formats: gguf "
                   "(q2_k..q6_k, q8_0), mlx (affine 2..8-bit g64) or all of them (default: gguf)")
    a.add_argument("--calib-tokens", type=int, default=2048, metavar="N", help="calibration tokens (default 2048)")
    a.add_argument("--calib-split", choices=("validation", "train"), default="validation",
                   help="stdlib split the calibration windows come from (default: validation; never test)")
    a.add_argument("--sensitivity", metavar="FILE", help="reuse the measurements of an earlier run (its "
                   "kimiq_sensitivity.json) instead of measuring again")
    a.add_argument("--device", default="cpu", help="where the sensitivity pass runs (default: cpu)")
    a.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice; 1 is "
                   "much faster on a machine whose cores other jobs use too)")


def _quantize(args) -> int:
    from kimiq import default_model_path
    from kimiq.config import ModelConfig
    from kimiq.quant.formats import FORMATS
    from kimiq.quant.recipes import RECIPES, plan_bytes

    src = args.model or str(default_model_path())
    if args.list:
        cfg = ModelConfig.from_file(src)
        print(f"recipes (bits per weight on {src}, all tensors counted):")
        for name, r in RECIPES.items():
            b, n = plan_bytes(cfg, r.plan(cfg))
            print(f"  {name:<12} {8 * b / n:6.3f} bpw  {r.doc}")
        print("formats:")
        for name, f in FORMATS.items():
            print(f"  {name:<13} {f.bits_per_weight:7.4f} bpw  {f.doc}")
        return 0
    auto = args.target_bpw is not None or args.target_size is not None
    if not args.out or bool(args.recipe) == auto:
        raise ValueError("--out and one of --recipe / --target-bpw / --target-size are required (or --list)")
    imatrix = None
    if args.imatrix:
        from safetensors.torch import load_file

        imatrix = load_file(args.imatrix)
    if auto:
        from kimiq.quant.sensitivity import quantize_auto

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)

        quantize_auto(src, args.out, target_bpw=args.target_bpw, target_size_gb=args.target_size, family=args.family,
                      calib_tokens=args.calib_tokens, calib_split=args.calib_split, imatrix=imatrix,
                      sensitivity=args.sensitivity, overwrite=args.overwrite, device=args.device)
        return 0
    from kimiq.quant.checkpoint import quantize_checkpoint

    quantize_checkpoint(src, args.recipe, args.out, imatrix=imatrix, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------------------------- imatrix
def _imatrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", metavar="FILE", required=True, help="output file (safetensors: checkpoint tensor "
                   "name -> float32 [in] mean squared activation); pass it to kimiq quantize --imatrix")
    p.add_argument("--data", metavar="FILE", help="calibration text (default: the default model's validation "
                   "split, stdlib files; never the test split kimiq eval scores)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window, each from a fresh state (default 512)")
    p.add_argument("--limit-tokens", type=int, default=32768, metavar="N", help="calibration tokens (default 32768)")
    _add_model_args(p)


def _imatrix(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from kimiq.eval.ppl import heldout_tokens, token_stream
    from kimiq.quant.imatrix import collect_imatrix, save_imatrix

    model, tok = _load(args)
    if args.data:
        tokens = token_stream(tok, [Path(args.data).read_text(encoding="utf-8")])[: args.limit_tokens]
    else:
        tokens = heldout_tokens(tok, args.limit_tokens, split="validation")[: args.limit_tokens]
    windows = [tokens[a : a + args.ctx].view(1, -1).to(model.device) for a in range(0, len(tokens), args.ctx)]
    bar = tqdm(total=len(windows), desc="imatrix", unit="window", dynamic_ncols=True)
    imat = collect_imatrix(model, windows, progress=lambda _: bar.update(1))
    bar.close()
    meta = {"data": args.data or "stdlib validation split", "tokens": len(tokens), "ctx": args.ctx,
            "model": str(args.model or "default")}
    print(f"{len(imat)} tensors from {len(tokens):,} tokens in {len(windows)} windows -> "
          f"{save_imatrix(imat, args.out, meta)}")
    return 0


# ---------------------------------------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="DIR", help="kimiq checkpoint, full precision or quantized "
                   "(default: the embedded model)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gguf", metavar="FILE", help="write a .gguf for llama.cpp (arch kimi-linear, tokenizer included)")
    g.add_argument("--mlx", metavar="DIR", help="write a directory mlx_lm.load runs (mlx-lm's names, tokenizer.json)")
    p.add_argument("--type", default="auto", metavar="TYPE", help="GGUF: f32 | f16 | bf16 | a GGUF recipe (q8_0, "
                   "q4_k_m, q5_k_m, q3_k_s, q2_k, mxfp4_moe) | auto: a quantized checkpoint's own blocks, else f32 "
                   "(default: auto)")
    p.add_argument("--recipe", metavar="NAME|FILE", help="mlx: quantize with an mlx recipe (mxfp4-g32, affine4-g64, "
                   "mixed-3.6, or a JSON file); default: float, or a quantized checkpoint's own parts")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16", help="mlx: dtype of float tensors "
                   "and scales (default: bf16, as mlx-lm converts)")
    p.add_argument("--overwrite", action="store_true", help="mlx: replace DIR if it exists")


def _export(args) -> int:
    from kimiq import default_model_path
    from kimiq.export.gguf import export_gguf

    src = args.model or default_model_path()
    if args.gguf:
        export_gguf(src, args.gguf, outtype=args.type)
    else:
        from kimiq.export.mlx import export_mlx

        export_mlx(src, args.mlx, recipe=args.recipe, dtype=args.dtype, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------------------------- plan
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="DIR", help="checkpoint directory, full precision or quantized "
                   "(default: the embedded model); '48b' = the built-in Kimi-Linear-48B-A3B config")
    p.add_argument("--config", choices=("kimi-linear-48b",), help="plan a built-in config (no checkpoint needed)")
    p.add_argument("--memory", metavar="SIZE", help="budget: 24GB (10^9), 24GiB / 24G (2^30), 512MiB")
    p.add_argument("-r", "--recipe", metavar="NAME|FILE", help="weight format: a quantize recipe (q8_0, q4_k_m, "
                   "mxfp4_moe, q2_k, ...; JSON file) or bf16 / f16 / f32 (default: the checkpoint's own)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence: breakdown at this context; "
                   "with --memory also the rows that fit")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default: 512)")
    p.add_argument("--last-only", action="store_true", help="prefill keeps only each row's last logits, as "
                   "'kimiq generate' does (default: full [chunk, vocab] logits per chunk, as 'kimiq eval')")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (kept weights, activations, "
                   "caches); auto = as 'kimiq generate' picks it (fp32 on CPU for small models, else the config's)")
    p.add_argument("--cache-dtype", choices=("auto", "fp32", "bf16"), default="auto", help="MLA latent cache "
                   "dtype, as 'kimiq generate --cache-dtype'; auto = the model dtype (default: auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="whose memory the budget is: cpu "
                   "(RAM; math attention) or cuda (GPU; fused attention, modelled) (default: cpu)")
    p.add_argument("--table", action="store_true", help="also print the budget x recipe table (printed anyway "
                   "without --memory and --context)")
    p.add_argument("--budgets", default="8,16,24,32,48,64,96", help="table budgets, GiB unless suffixed")
    p.add_argument("--recipes", default="bf16,q8_0,q4_k_m,mxfp4_moe,q2_k", help="table rows (comma-separated)")
    p.add_argument("--measure", action="store_true", help="run a CPU prefill of --context tokens in a fresh "
                   "process and print its peak RSS next to the prediction")


def _plan(args) -> int:
    from kimiq.eval import plan as P

    src = P.resolve_source(args.model, args.config)
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype / --cache-dtype -> torch names
    dtype = names.get(args.dtype, src.cfg.dtype)
    if args.dtype == "auto" and args.device == "cpu" and src.path is not None and _small(src.path):
        dtype = "float32"
    device = P.DEVICES[args.device]
    cache_dtype = names.get(args.cache_dtype, "")

    def planner(recipe):  # a float "recipe" (bf16 / f16 / f32) is the model dtype too
        dt = {2: "bfloat16" if recipe == "bf16" else "float16", 4: "float32"}[P.FLOAT_RECIPES[recipe]] \
            if recipe in P.FLOAT_RECIPES else dtype
        w = P.weight_footprint(src.cfg, recipe, dtype=dt, formats=src.formats, label=src.recipe)
        return P.Planner(src.cfg, w, dt, device, args.chunk, src.label, args.last_only, cache_dtype)

    main_planner = planner(args.recipe)
    budget = P.parse_size(args.memory) if args.memory else None
    print(P.report(main_planner, budget=budget, batch=args.batch, context=args.context))
    if args.table or (budget is None and args.context is None):
        recipes = [r for r in args.recipes.split(",") if r] if not src.formats else []
        rows = [main_planner] + [planner(r) for r in recipes if r != main_planner.weights.label]
        budgets = [P.parse_size(b) for b in args.budgets.split(",") if b]
        print()
        print(P.capacity_table(rows, budgets, batch=args.batch, context=args.context))
    if args.measure:
        if src.path is None or not args.context:
            raise ValueError("--measure needs a checkpoint directory and --context")
        m = P.measure_prefill(src.path, args.context, args.chunk, args.batch, dtype, args.last_only,
                              cache_dtype=cache_dtype)
        pred = main_planner.plan(args.context, args.batch).model_bytes
        print(f"\nmeasured prefill peak (RSS over a warmed-up process, {m.method}): {m.peak / 2**20:.1f} MiB "
              f"in {m.seconds:.1f} s; predicted {pred / 2**20:.1f} MiB ({100 * (pred - m.peak) / m.peak:+.1f}%); "
              f"baseline {m.baseline / 2**20:.0f} MiB")
    return 0


COMMANDS = {
    "generate": (_generate_args, _generate, "continue a prompt with a model (streamed)"),
    "chat": (_chat_args, _chat, "chat with a model; the state is kept between turns"),
    "verify": (_verify_args, _verify, "check a checkpoint's SHA256SUMS and tensor inventory"),
    "eval": (_eval_args, _eval, "measure a model: bpb (bits per byte vs xz), ppl, kld against a base, compare builds"),
    "train": (_train_args, _train, "rebuild the tokenizer and a small Kimi-Linear from the stdlib sources (seeded)"),
    "quantize": (_quantize_args, _quantize, "quantize a checkpoint with a recipe (GGUF k-quants, MXFP4, mlx affine)"),
    "export": (_export_args, _export, "write a checkpoint for llama.cpp (GGUF) or mlx-lm"),
    "plan": (_plan_args, _plan, "memory planner: weights, state, cache and buffers; longest context for a budget"),
    "imatrix": (_imatrix_args, _imatrix, "collect an importance matrix (mean squared activations) for quantize"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kimiq",
        description="Run Kimi-Linear (KDA + MLA mixture-of-experts) models in PyTorch, on CPU or CUDA.",
        epilog="Run 'kimiq COMMAND --help' for a command's options.",
    )
    from kimiq import __version__

    ap.add_argument("--version", action="version", version=f"kimiq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:  # clear one-line errors for bad input
        print(f"kimiq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
