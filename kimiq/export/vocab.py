"""The byte-level BPE vocabulary in other engines' forms: GPT-2 byte-to-unicode tokens, merges rebuilt from
tiktoken ranks (GGUF ``tokenizer.ggml.*``), and a Hugging Face ``tokenizer.json`` with Kimi's split pattern
(mlx-lm / transformers load it without remote code or the ``tiktoken`` package)."""

from __future__ import annotations

import json
from pathlib import Path

from kimiq.tokenizer import PAT_STR, Tokenizer

__all__ = ["byte_to_unicode", "bpe_merges", "hf_tokenizer_json"]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what GGUF BPE vocabularies store)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Re-run byte-level BPE on ``token`` with merges of rank < max_rank (tiktoken's merge order)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


def bpe_merges(ranks: dict[bytes, int]) -> list[str]:
    """Merges in rank order, each ``"A B"`` in byte-to-unicode form: the pair a multi-byte token is made of."""
    enc = byte_to_unicode()
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) == 2:
            out.append(" ".join("".join(enc[b] for b in p) for p in parts))
    return out


def hf_tokenizer_json(tok: Tokenizer, ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ``tokenizer.json``: BPE over byte-level strings, ``ignore_merges`` (tiktoken encodes a piece that is
    itself a token directly), pre-tokenizer = Kimi's pattern then ByteLevel, the 256 specials as added tokens."""
    enc = byte_to_unicode()
    vocab = {"".join(enc[b] for b in t): r for t, r in ranks.items()}
    added = [{"id": i, "content": tok.id_to_token(i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": tok.is_special(i)} for i in range(tok.n_base, tok.vocab_size)]
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [m.split(" ") for m in bpe_merges(ranks)]},
    }  # fmt: skip
    p = Path(path)
    p.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return p
