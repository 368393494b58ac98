"""kimiq's CPU kernels as torch operators (``torch.ops.kimiq_cpu``), for compiled graphs.

    if qops.available():
        y = torch.ops.kimiq_cpu.qlinear(x, blocks, qops.FORMAT_ID["q6_k"], out_features)

``csrc/qops.cpp`` wraps the kernels of ``csrc/qmatmul.c`` (GGUF formats) in three operators: a linear layer, a
whole routed-expert MoE step for the chosen experts (one call per layer instead of three per expert), and an
embedding lookup that dequantizes only the rows asked for.  ``csrc/kda_step.cpp`` adds one KDA decode step in place
on the recurrent state (``kimiq.ops.kda.kda_decode_``), ``csrc/mla_decode.cpp`` MLA's absorbed decode attention in
one pass over the latent cache (``KimiMLAAttention.decode``).  Being C++ operators, inductor's C++ wrapper calls
them through the dispatcher without entering Python, which the Python custom ops of ``kimiq.quant.opaque`` cannot
avoid (~15 µs a call, more than the kernel at the default model's width).  The library is compiled against the
running torch on first use (~30 s; cached in ``$XDG_CACHE_HOME/kimiq/kernels``), never at import; without a C++
compiler or torch headers ``available()`` is False and callers keep the opaque Python ops.  Tested against the
eager modules in ``tests/ops/test_qops.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from . import qmatmul

__all__ = ["available", "loaded", "FORMAT_ID"]

FORMAT_ID = {name: i for i, name in enumerate(qmatmul.GGUF_KERNELS)}  # the order of qops.cpp's tables
_SRC = Path(__file__).parent / "csrc" / "qops.cpp"
_KDA_SRC = Path(__file__).parent / "csrc" / "kda_step.cpp"
_MLA_SRC = Path(__file__).parent / "csrc" / "mla_decode.cpp"
_CXX_SRCS = (_SRC, _KDA_SRC, _MLA_SRC)


class _State:
    loaded = False
    tried = False
    error: str | None = None


def _build() -> Path:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cxx or not cc:
        raise RuntimeError("no C/C++ compiler (cc, c++) on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    cflags = [f for f in qmatmul._FLAGS if f != "-shared"]  # qmatmul.c as an object to link in
    cxxflags = ["-O3", "-march=native", "-fPIC", "-fopenmp", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]
    ldflags = ["-shared", "-fopenmp", *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs],
               "-lc10", "-ltorch_cpu", "-ltorch", "-lm"]
    key = (b"".join(src.read_bytes() for src in _CXX_SRCS) + qmatmul._SRC.read_bytes()
           + " ".join([cc, cxx, torch.__version__, *cflags, *cxxflags, qmatmul._cpu_id()]).encode())

    def commands(tmp: Path) -> list[list[str]]:
        obj, cpp_objs = str(tmp / "qmatmul.o"), [str(tmp / f"{src.stem}.o") for src in _CXX_SRCS]
        return [[cc, *cflags, "-c", str(qmatmul._SRC), "-o", obj],
                *[[cxx, *cxxflags, "-c", str(src), "-o", o] for src, o in zip(_CXX_SRCS, cpp_objs)],
                [cxx, *cpp_objs, obj, "-o", str(tmp / "qops.so"), *ldflags]]

    return qmatmul.build_cached("qops", key, commands)


def _register_fakes() -> None:
    @torch.library.register_fake("kimiq_cpu::qlinear")
    def _(x, w, fmt, N):
        return x.new_empty(*x.shape[:-1], N)

    @torch.library.register_fake("kimiq_cpu::qexperts")
    def _(x, weights, idx, w1, w3, w2, f1, f3, f2):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kimiq_cpu::qrows")
    def _(w, ids, fmt, D, bf16):
        return w.new_empty(*ids.shape, D, dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.library.register_fake("kimiq_cpu::kda_step")
    def _(S, q, k, v, g, beta, scale):
        return S.new_empty(v.shape)

    @torch.library.register_fake("kimiq_cpu::mla_decode")
    def _(q, past, new, lengths, scale, value_dim):
        return q.new_empty(*q.shape[:2], value_dim, dtype=torch.float32)


def available() -> bool:
    """True when the operators are loaded (builds and loads them on the first call)."""
    if not _State.tried:
        _State.tried = True
        if sys.platform == "win32":
            _State.error = "not built on Windows"
        else:
            try:
                torch.ops.load_library(str(_build()))
                _register_fakes()
                _State.loaded = True
            except (RuntimeError, OSError) as e:
                _State.error = str(e)
                warnings.warn(f"kimiq: C++ operators unavailable, compiled graphs use the torch / Python paths ({e})",
                              stacklevel=2)
    return _State.loaded


def loaded() -> bool:
    """True when ``available()`` has loaded the operators (never builds: safe while dynamo traces)."""
    return _State.loaded
