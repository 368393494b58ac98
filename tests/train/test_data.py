"""Stdlib corpus: deterministic split by path hash, chat examples that parse, token streams."""

from __future__ import annotations

import ast

from kimiq.train.data import chat_examples, split_of, stdlib_files


def test_split_is_by_path_hash_and_about_96_2_2():
    files = stdlib_files()
    assert len(files) > 500 and all("site-packages" not in r for r, _ in files)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    counts = {s: 0 for s in ("train", "validation", "test")}
    for rel, _ in files:
        counts[split_of(rel)] += 1
    n = len(files)
    assert 0.93 < counts["train"] / n < 0.99
    assert 0.005 < counts["validation"] / n < 0.04 and 0.005 < counts["test"] / n < 0.04


SRC = '''
def add(a, b=1, *args, key=None):
    """Add two numbers.

    More text that is not the summary.
    """
    return a + b


class Box:
    """A box."""

    def size(self):
        """Return the size."""
        return 3

    def _nodoc(self):
        return 1
'''


def test_chat_examples():
    ex = dict(chat_examples(SRC))
    assert ex["Write a Python function `add(a, b=1, *args, key=None)`: Add two numbers."].startswith("def add(")
    assert "Write a Python class `Box`: A box." in ex
    method = ex["Write a Python function `size(self)`: Return the size."]
    assert method.startswith("def size(self):\n    ")  # dedented to top level
    for code in ex.values():
        ast.parse(code)
    assert list(chat_examples("def broken(:\n")) == []
