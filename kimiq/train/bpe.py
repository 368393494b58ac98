"""Byte-level BPE training over Kimi-pre-tokenized text, producing tiktoken ``mergeable_ranks``.

    ranks = train_bpe(texts, vocab_size=3840)     # {token bytes: rank}, ranks 0..3839
    write_tokenizer_files(out_dir, ranks)         # kimiq.tokenizer: tiktoken.model + tokenizer_config.json

Text is split with the Kimi pattern (``kimiq.tokenizer.PAT_STR``, the same regex tiktoken applies at
encode time), so no merge ever crosses a piece boundary and tiktoken's lowest-rank-first BPE reproduces
the training merges.  Ranks 0..255 are the single bytes in byte order; every later rank is one merge,
in training order.  Merge choice: the pair with the highest count; ties go to the lexicographically
smallest (left bytes, right bytes), so a run is deterministic whatever the dict order.

Incremental algorithm (as in the HF/minbpe trainers): pair counts and a pair -> words index are kept
up to date, so each merge touches only the words containing its pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

__all__ = ["train_bpe", "count_pieces"]


def count_pieces(texts: Iterable[str]) -> Counter[str]:
    """Counts of Kimi pre-tokenizer pieces over ``texts``."""
    import regex  # the Kimi pattern needs regex.V1 (class intersection); imported only when training

    from kimiq.tokenizer import PAT_STR

    pat = regex.compile(PAT_STR, flags=regex.V1)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pat.findall(text))
    return counts


def train_bpe(
    texts: Iterable[str] | Counter[str],
    vocab_size: int,
    *,
    min_count: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict[bytes, int]:
    """Learn ``vocab_size - 256`` merges (fewer if no pair occurs ``min_count`` times).

    ``texts``: strings, or a ready ``Counter`` of pre-tokenized pieces.  ``progress(done, total)`` is
    called every 64 merges.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    pieces = texts if isinstance(texts, Counter) else count_pieces(texts)
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    words: list[list[int]] = []
    freq: list[int] = []
    for piece, c in sorted(pieces.items()):  # sorted: word order (and so everything) is deterministic
        b = piece.encode("utf-8")
        if len(b) > 1:
            words.append(list(b))
            freq.append(c)

    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for p in zip(ids, ids[1:]):
            pair_count[p] += freq[w]
            where[p].add(w)

    def key(p: tuple[int, int]) -> tuple[int, bytes, bytes, tuple[int, int]]:
        return (-pair_count[p], vocab[p[0]], vocab[p[1]], p)

    heap = [key(p) for p in pair_count]
    heapq.heapify(heap)
    total = vocab_size - 256
    while len(vocab) < vocab_size and heap:
        neg, _, _, p = heapq.heappop(heap)
        if pair_count.get(p, 0) != -neg:  # stale entry
            continue
        if -neg < min_count:
            break
        new = len(vocab)
        vocab.append(vocab[p[0]] + vocab[p[1]])
        changed: set[tuple[int, int]] = set()
        for w in sorted(where.pop(p)):
            ids, c = words[w], freq[w]
            for q in zip(ids, ids[1:]):  # remove this word's old pairs
                pair_count[q] -= c
                changed.add(q)
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == p[0] and ids[i + 1] == p[1]:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
            for q in zip(ids, ids[1:]):
                if q != p:
                    where[q].discard(w)
            for q in zip(out, out[1:]):  # add the new ones
                pair_count[q] += c
                where[q].add(w)
                changed.add(q)
        pair_count.pop(p, None)
        for q in changed:
            if q == p:
                continue
            if pair_count[q] > 0:
                heapq.heappush(heap, key(q))
            else:
                pair_count.pop(q, None)
                where.pop(q, None)
        if progress is not None and (len(vocab) - 256) % 64 == 0:
            progress(len(vocab) - 256, total)
    return {tok: rank for rank, tok in enumerate(vocab)}
