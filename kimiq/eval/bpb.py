"""Bits per byte of a model on held-out source files, next to ``xz -9``'s on the same bytes.

    report = heldout_bpb(model, tokenizer, files)       # files: [(name, text)]
    print(report)                                       # model bpb, xz bpb (concatenated and per file)

Model: each file is scored on its own as ``[EOS] text`` (the [EOS] stands for "a new document starts",
as in training), every token predicted from all earlier tokens of the file: the file is fed in
``window``-token pieces that carry the recurrent / latent state, so context is never cut.
bits = sum of -log2 p(token) over the file's tokens (not the [EOS]); bytes = the file's UTF-8 bytes.

xz: ``lzma`` at preset 9 | EXTREME (what ``xz -9e`` does), once over the concatenated files (xz then
sees the other files as context, the stronger baseline) and once per file (the same unit the model
gets).  The model should be compared against the stronger one.
"""

from __future__ import annotations

import lzma
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BpbReport", "heldout_bpb", "model_bits", "xz_bits"]


@dataclass(frozen=True)
class BpbReport:
    n_files: int
    n_bytes: int
    n_tokens: int
    model_bits: float
    xz_concat_bits: float
    xz_per_file_bits: float

    @property
    def model_bpb(self) -> float:
        return self.model_bits / self.n_bytes

    @property
    def xz_concat_bpb(self) -> float:
        return self.xz_concat_bits / self.n_bytes

    @property
    def xz_per_file_bpb(self) -> float:
        return self.xz_per_file_bits / self.n_bytes

    def __str__(self) -> str:
        return (
            f"{self.n_files} files, {self.n_bytes:,} bytes, {self.n_tokens:,} tokens "
            f"({self.n_bytes / max(1, self.n_tokens):.2f} bytes/token)\n"
            f"  model          {self.model_bpb:.4f} bits/byte  "
            f"({self.model_bits / max(1, self.n_tokens) * math.log(2):.4f} nats/token)\n"
            f"  xz -9e concat  {self.xz_concat_bpb:.4f} bits/byte\n"
            f"  xz -9e per file {self.xz_per_file_bpb:.4f} bits/byte"
        )


@torch.inference_mode()
def model_bits(model, tokenizer, text: str, window: int = 512, max_context: int | None = None) -> tuple[float, int]:
    """(-log2 likelihood of ``text`` in bits, number of tokens) under ``model``.

    Full-file context by default; ``max_context``: start a fresh state every that many tokens
    (non-overlapping segments, every token scored, as a model trained on short windows would see it).
    """
    eos = tokenizer.token_to_id("[EOS]")
    ids = torch.tensor([[eos, *tokenizer.encode(text)]], dtype=torch.long, device=model.device)
    T = ids.shape[1]
    seg = max_context or T
    nats = 0.0
    for s0 in range(0, T - 1, seg):  # segments of seg predicted tokens, each from a fresh state
        s1 = min(s0 + seg, T - 1)
        state = model.new_state(1, capacity=s1 - s0)
        for a in range(s0, s1, window):
            b = min(a + window, s1)
            logits = model(ids[:, a:b], state)  # [1, b - a, V] fp32
            nats += float(F.cross_entropy(logits[0], ids[0, a + 1 : b + 1], reduction="sum"))
    return nats / math.log(2), T - 1


def xz_bits(data: bytes) -> float:
    return 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def heldout_bpb(model, tokenizer, files: Sequence[tuple[str, str]], window: int = 512,
                max_context: int | None = None, progress=None) -> BpbReport:
    bits, n_tok, per_file_xz = 0.0, 0, 0.0
    blobs = []
    for name, text in files:
        b, n = model_bits(model, tokenizer, text, window, max_context)
        bits += b
        n_tok += n
        blob = text.encode("utf-8")
        blobs.append(blob)
        per_file_xz += xz_bits(blob)
        if progress is not None:
            progress(name)
    data = b"".join(blobs)
    return BpbReport(len(files), len(data), n_tok, bits, xz_bits(data), per_file_xz)
