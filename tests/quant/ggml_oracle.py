"""llama.cpp's own quantizers, called through ctypes, as the bit-exactness oracle for kimiq.quant.

Where the quantizers come from, first found wins:

1. an installed ``llama_cpp`` (llama-cpp-python) package: its ``libggml-base`` exports
   ``quantize_q4_K`` & co., the code ``llama_model_quantize`` runs;
2. ``ggml-quants.c`` from the llama-cpp-python 0.3.36 source distribution (``$KIMIQ_GGML_SRC`` = an
   unpacked ``vendor/llama.cpp/ggml`` folder, else ``pip download`` into ``~/.cache/kimiq``),
   compiled with gcc into a small library beside it.  ggml builds this file without ``-march``
   flags (only ggml-cpu gets them), so plain ``-O2`` reproduces its float arithmetic.

``oracle()`` returns None (tests skip, saying why) when neither works, e.g. offline without a cache.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
# ggml_type ids (ggml.h) and sizes: name -> (type id, weights per block, bytes per block)
TYPES = {"q4_0": (2, 32, 18), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24), "q8_0": (8, 32, 34), "q2_k": (10, 256, 84),
         "q3_k": (11, 256, 110), "q4_k": (12, 256, 144), "q5_k": (13, 256, 176), "q6_k": (14, 256, 210),
         "mxfp4": (39, 32, 17)}
_FUNC = {"q4_0": "quantize_q4_0", "q5_0": "quantize_q5_0", "q5_1": "quantize_q5_1", "q8_0": "quantize_q8_0",
         "q2_k": "quantize_q2_K", "q3_k": "quantize_q3_K", "q4_k": "quantize_q4_K", "q5_k": "quantize_q5_K",
         "q6_k": "quantize_q6_K", "mxfp4": "quantize_mxfp4"}

_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) {
  fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
static size_t blck(int t) { return (t == 2 || t == 6 || t == 7 || t == 8 || t == 39) ? 32 : 256; }
size_t ggml_type_size(int t) {
  switch (t) { case 2: return 18; case 6: return 22; case 7: return 24; case 8: return 34; case 39: return 17;
               case 10: return 84; case 11: return 110; case 12: return 144; case 13: return 176; case 14: return 210;
               default: abort(); } }
size_t ggml_row_size(int t, int64_t ne) { return ggml_type_size(t) * ne / blck(t); }
const char * ggml_type_name(int t) { (void) t; return "?"; }
"""


class Oracle:
    def __init__(self, lib: ctypes.CDLL, origin: str):
        self.lib = lib
        self.origin = origin
        for f in _FUNC.values():
            fn = getattr(lib, f)
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(self, name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """x float32 [rows, K] -> uint8 [rows, K/blk*bytes], llama.cpp's bytes (``quantize_<type>``)."""
        _, qk, nbytes = TYPES[name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, K = x.shape
        out = np.zeros((rows, K // qk * nbytes), np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        getattr(self.lib, _FUNC[name])(x.ctypes.data, out.ctypes.data, rows, K,
                                       None if qw is None else qw.ctypes.data)
        return out


def _from_llama_cpp() -> Oracle | None:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return None
    libdir = Path(sys.modules["llama_cpp"].__file__).parent / "lib"
    for cand in sorted(libdir.glob("libggml-base*.so*")):
        try:
            return Oracle(ctypes.CDLL(str(cand)), f"llama-cpp-python {cand.name}")
        except (OSError, AttributeError):
            continue
    return None


def _ggml_src(cache: Path) -> Path | None:
    env = os.environ.get("KIMIQ_GGML_SRC")
    if env and (Path(env) / "src" / "ggml-quants.c").exists():
        return Path(env)
    src = cache / "ggml"
    if (src / "src" / "ggml-quants.c").exists():
        return src
    sdist_dir = cache / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    tars = list(sdist_dir.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not tars:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(sdist_dir)],
                           capture_output=True, text=True, timeout=600)
        tars = list(sdist_dir.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        if r.returncode or not tars:
            return None
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/ggml/"
    with tarfile.open(tars[0]) as tf:
        for m in tf.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if m.isfile() and rel.split("/")[0] in ("include", "src") and \
                    (rel.endswith(".h") or rel == "src/ggml-quants.c"):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                (src / rel).write_bytes(tf.extractfile(m).read())
    return src if (src / "src" / "ggml-quants.c").exists() else None


def _compiled(cache: Path) -> Oracle | None:
    lib = cache / "libggml-quants-oracle.so"
    if not lib.exists():
        src = _ggml_src(cache)
        cc = shutil.which("gcc") or shutil.which("cc")
        if src is None or cc is None:
            return None
        (cache / "stubs.c").write_text(_STUBS)
        tmp = lib.with_suffix(".tmp.so")
        r = subprocess.run([cc, "-O2", "-fPIC", "-shared", "-std=gnu11", f"-I{src}/include", f"-I{src}/src",
                            str(src / "src" / "ggml-quants.c"), str(cache / "stubs.c"), "-o", str(tmp), "-lm"],
                           capture_output=True, text=True)
        if r.returncode:
            return None
        tmp.replace(lib)
    return Oracle(ctypes.CDLL(str(lib)), f"ggml-quants.c from llama-cpp-python {VERSION} (gcc -O2)")


@functools.cache
def oracle() -> Oracle | None:
    found = _from_llama_cpp()
    if found is not None:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kimiq" / f"ggml-{VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return _compiled(cache)
    except (OSError, subprocess.SubprocessError, tarfile.TarError):
        return None
