"""Fused dequantize-matmul on CPU for packed weights: ``y = x @ dequantize(W)^T`` without materializing W.

    y = qmatmul("q4_k", parts, x2, out_features)     # x2 [M, K] fp32/bf16, M <= 16; None if not possible

The kernels (``csrc/qmatmul.c``) read the stored layout directly: GGUF blocks (Q8_0, Q4_0, Q5_0, Q5_1,
MXFP4, Q2_K..Q6_K) and mlx's affine 2-8-bit / MXFP4 codes, so quantized experts stacked ``[E, ...]``
need no repacking.  They are compiled once per machine with the host C compiler (``-O3 -march=native
-fopenmp``) into ``$XDG_CACHE_HOME/kimiq/kernels`` on first use, never at import.  Without a compiler
``available()`` is False and callers keep the reference path (dequantize, then ``F.linear``), which
is what these kernels are tested against (``tests/ops/test_qmatmul.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["available", "qmatmul", "dequantize", "int8_activations", "build_cached", "GGUF_KERNELS", "MAX_ROWS",
           "GEMM_ROWS", "prepare"]

MAX_ROWS = 16  # activation rows per call (decode, speculative verification); prefill uses the reference path
GEMM_ROWS = 64  # from this many rows on, dequantizing in C then a dense GEMM beats every fused kernel (prefill)
GGUF_KERNELS = ("q8_0", "q4_0", "mxfp4", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
_SRC = Path(__file__).parent / "csrc" / "qmatmul.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


class _Lib:
    """The loaded shared library (or the reason it is not there); one per process, built on demand."""

    handle: ctypes.CDLL | None = None
    error: str | None = None
    tried = False
    i8 = False  # the build quantizes activations to int8 (kq_i8_activations), read once: a plain bool, traceable


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kimiq" / "kernels"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_cached(stem: str, key: bytes, commands) -> Path:
    """The shared object ``<cache>/<stem>-<hash of key>.so``, built once per machine: ``commands(tmp)`` gives the
    compiler command lines that write ``tmp / "<stem>.so"`` inside a private temporary folder, from which the result
    is moved into place atomically (concurrent builders never load a partial file).  Raises RuntimeError with the
    compiler's message."""
    out = _cache_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for cmd in commands(Path(tmp)):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"building {stem} failed:\n{' '.join(cmd)}\n{r.stderr[-2000:]}")
        os.replace(Path(tmp) / f"{stem}.so", out)
    return out


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    key = _SRC.read_bytes() + " ".join([cc, *_FLAGS, platform.machine(), _cpu_id()]).encode()
    out = build_cached("qmatmul", key, lambda tmp: [[cc, *_FLAGS, "-o", str(tmp / "qmatmul.so"), str(_SRC), "-lm"]])
    lib = ctypes.CDLL(str(out))
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name in GGUF_KERNELS:
        f = getattr(lib, f"kq_{name}")
        f.argtypes, f.restype = [vp, i64, i64, vp, i64, vp, ci, ci], ci
        f = getattr(lib, f"kq_rows_{name}")
        f.argtypes, f.restype = [vp, i64, vp, i64, vp, ci], ci
    lib.kq_i8_activations.argtypes, lib.kq_i8_activations.restype = [], ci
    lib.kq_affine.argtypes = [vp, vp, vp, ci, ci, i64, i64, vp, i64, vp, ci, ci]
    lib.kq_mxfp4_mlx.argtypes = [vp, vp, i64, i64, vp, i64, vp, ci, ci]
    lib.kq_affine.restype = lib.kq_mxfp4_mlx.restype = ci
    return lib


def _lib() -> ctypes.CDLL | None:
    if not _Lib.tried:
        _Lib.tried = True
        if sys.platform == "win32":
            _Lib.error = "not built on Windows"
        else:
            try:
                _Lib.handle = _build()
                _Lib.i8 = bool(_Lib.handle.kq_i8_activations())
            except (RuntimeError, OSError) as e:
                _Lib.error = str(e)
                warnings.warn(f"kimiq: fused quantized matmul kernels unavailable, using the reference path ({e})",
                              stacklevel=3)
    return _Lib.handle


I8_BLOCKS = {"q8_0": 32, "q4_0": 32, "mxfp4": 32, "q4_k": 256, "q6_k": 256}  # csrc/qmatmul.c: activation block


def int8_activations(fmt: str) -> int:
    """The block size (32, or 256 for Q4_K / Q6_K as llama.cpp's Q8_K) over which ``fmt``'s kernel quantizes the
    activations to int8 and multiplies with int8 dot products (AVX512-VNNI builds; llama.cpp does the same for these
    formats), else 0.  2-3x faster, with an error per output of at most sum_i |w_i| * max|x| over i's block / 254."""
    if fmt not in I8_BLOCKS or _lib() is None or not _Lib.i8:
        return 0
    return I8_BLOCKS[fmt]


def available() -> bool:
    """True when the kernels are built (builds them on the first call)."""
    return _lib() is not None


def prepare(fmt: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tensors a kernel reads for ``fmt`` (fp32 scales for mlx affine), or None if no kernel takes it.
    Done once per module; for stacked experts the leading ``[E]`` dim is kept."""
    if fmt in GGUF_KERNELS:
        return {"weight": parts["weight"].contiguous()}
    if fmt.startswith("affine"):
        return {"weight": parts["weight"].contiguous(), "scales": parts["scales"].float().contiguous(),
                "biases": parts["biases"].float().contiguous()}
    if fmt == "mxfp4-mlx":
        return {"weight": parts["weight"].contiguous(), "scales": parts["scales"].contiguous()}
    return None


def _ptr(t: torch.Tensor, index: int | None) -> int:
    if index is None:
        return t.data_ptr()
    return t.data_ptr() + index * t.stride(0) * t.element_size()


def qmatmul(fmt: str, prepared: dict[str, torch.Tensor], x2: torch.Tensor, out_features: int,
            index: int | None = None, rows_unlimited: bool = False) -> torch.Tensor | None:
    """``x2 [M, K] @ W^T -> [M, out_features]`` in x2's dtype, W given by ``prepare``'s tensors (``index``:
    which expert of a stacked ``[E, ...]`` set).  None when the kernel cannot run (no library, device,
    dtype, more than MAX_ROWS rows unless ``rows_unlimited``: then in calls of MAX_ROWS): the caller then takes
    the reference path."""
    M, K = x2.shape
    if (M > MAX_ROWS and not rows_unlimited) or x2.device.type != "cpu" or x2.dtype not in (
            torch.float32, torch.bfloat16) or _lib() is None:
        return None
    lib = _Lib.handle
    x2 = x2.contiguous()
    y = torch.empty(M, out_features, dtype=x2.dtype)
    bf16, nt = int(x2.dtype == torch.bfloat16), torch.get_num_threads()
    w = _ptr(prepared["weight"], index)
    for m0 in range(0, M, MAX_ROWS):  # the kernels take MAX_ROWS rows a call
        m, xp, yp = min(MAX_ROWS, M - m0), x2[m0].data_ptr(), y[m0].data_ptr()
        if fmt in GGUF_KERNELS:
            rc = getattr(lib, f"kq_{fmt}")(w, out_features, K, xp, m, yp, bf16, nt)
        elif fmt == "mxfp4-mlx":
            rc = lib.kq_mxfp4_mlx(w, _ptr(prepared["scales"], index), out_features, K, xp, m, yp, bf16, nt)
        else:  # affine{bits}-g{group}
            bits, group = int(fmt[6]), int(fmt.split("-g")[1])
            rc = lib.kq_affine(w, _ptr(prepared["scales"], index), _ptr(prepared["biases"], index), bits, group,
                               out_features, K, xp, m, yp, bf16, nt)
        if rc:
            return None
    return y


def dequantize(fmt: str, prepared: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
               index: int | None = None) -> torch.Tensor | None:
    """The whole matrix ``[N, K]`` of a GGUF format dequantized by the C decoders (~10x faster than the torch
    reference, same values), in fp32 or bf16; ``index``: which expert of a stacked set.  None when not possible."""
    if fmt not in GGUF_KERNELS or dtype not in (torch.float32, torch.bfloat16) or _lib() is None:
        return None
    N, K = shape
    y = torch.empty(N, K, dtype=dtype)
    rc = getattr(_Lib.handle, f"kq_rows_{fmt}")(_ptr(prepared["weight"], index), K, None, N, y.data_ptr(),
                                                  int(dtype == torch.bfloat16))
    return y if rc == 0 else None
