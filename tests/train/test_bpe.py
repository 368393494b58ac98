"""BPE trainer: agrees with a plain re-count-everything trainer, is deterministic, and tiktoken reproduces it."""

from __future__ import annotations

from collections import Counter

import tiktoken

from kimiq.tokenizer import PAT_STR
from kimiq.train.bpe import count_pieces, train_bpe
from tests.test_tokenizer import CORPUS, SAMPLES


def slow_bpe(pieces: Counter[str], vocab_size: int) -> dict[bytes, int]:
    """Recount all pairs before every merge; same tie rule (highest count, then smallest bytes)."""
    vocab = [bytes([i]) for i in range(256)]
    words = {w: [bytes([b]) for b in w.encode()] for w in pieces}
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in pieces.items():
            for p in zip(words[w], words[w][1:]):
                pairs[p] += c
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        vocab.append(a + b)
        for w, s in words.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            words[w] = out
    return {t: r for r, t in enumerate(vocab)}


def test_matches_slow_trainer_and_is_deterministic():
    pieces = count_pieces([CORPUS])
    fast = train_bpe(pieces, 400)
    assert fast == slow_bpe(pieces, 400)
    assert train_bpe(Counter(dict(reversed(list(pieces.items())))), 400) == fast  # insertion order irrelevant
    assert sorted(fast.values()) == list(range(len(fast)))


def test_tiktoken_encoding_reproduces_training_merges():
    ranks = train_bpe([CORPUS], 500)
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    for text in SAMPLES.values():
        assert enc.decode(enc.encode(text)) == text
    # A frequent training word is a single token.
    assert len(enc.encode(" return")) == 1
    assert len(enc.encode(CORPUS)) < len(CORPUS.encode()) / 2


def test_min_count_stops_early():
    ranks = train_bpe(["ab ab cd"], 10_000)
    assert len(ranks) < 300 and b"ab" in ranks and b"cd" not in ranks
