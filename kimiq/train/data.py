"""Training data every machine has: the running Python's standard-library sources.

    files = stdlib_files()                       # [(relative path, Path)], sorted, *.py under sysconfig stdlib
    split_of("json/decoder.py")                  # "train" | "validation" | "test", by a hash of the path
    chat_examples(source)                        # (user, assistant) pairs: docstring -> the function's code
    tokens = encode_split(tok, "train")          # one int32 stream: doc [EOS] chat [EOS] doc [EOS] ...

Split: ``sha256(relative path) % 100`` < 96 train, 96-97 validation, 98-99 test, so a file stays in its
split across machines and Python patch versions.  site-packages is excluded.  Chat examples come only
from the train split's files, so the held-out splits stay plain source.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["stdlib_root", "stdlib_files", "split_of", "split_files", "chat_examples", "encode_split", "SPLITS"]

SPLITS = ("train", "validation", "test")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """All ``*.py`` files of the standard library (sorted by relative path), site-packages excluded."""
    root = root or stdlib_root()
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel or not f.is_file():
            continue
        out.append((rel, f))
    return sorted(out)


def split_of(rel: str) -> str:
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if h < 96 else "validation" if h < 98 else "test"


def split_files(split: str, root: Path | None = None, limit: int | None = None) -> list[tuple[str, Path]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = [(r, f) for r, f in stdlib_files(root) if split_of(r) == split]
    return files[:limit] if limit else files


def read_source(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 (a few stdlib test files are deliberately not)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def chat_examples(source: str, max_chars: int = 3000) -> Iterator[tuple[str, str]]:
    """(user, assistant) turns from top-level and method definitions that have a docstring.

    user: ``Write a Python function `name(args)`: <first docstring paragraph>``; assistant: the
    definition's source (docstring included), when it is at most ``max_chars`` long.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("__"):
            continue
        code = ast.get_source_segment(source, node)
        if not code or len(code) > max_chars:
            continue
        summary = doc.strip().split("\n\n")[0].strip()
        if isinstance(node, ast.ClassDef):
            ask = f"Write a Python class `{node.name}`: {summary}"
        else:
            ask = f"Write a Python function `{node.name}({ast.unparse(node.args)})`: {summary}"
        indent = node.col_offset
        if indent:  # dedent a method to top level
            code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in code.split("\n"))
        yield ask, code


def encode_split(tokenizer, split: str, *, root: Path | None = None, limit: int | None = None,
                 chat_every: int = 0, progress=None) -> np.ndarray:
    """Token stream of a split: every file as ``text [EOS]``; with ``chat_every = n > 0`` every n-th chat
    example of the file follows it as a rendered one-turn conversation ``chat [EOS]``.

    No [BOS]: the chat template and ``kimiq generate`` start without one, and training windows start at
    random offsets anyway; [EOS] separates documents (and is what a reply ends with after <|im_end|>)."""
    eos = tokenizer.token_to_id("[EOS]")
    parts: list[np.ndarray] = []
    n_chat = 0
    for rel, f in split_files(split, root, limit):
        text = read_source(f)
        if text is None:
            continue
        parts.append(np.asarray([*tokenizer.encode(text), eos], dtype=np.int32))
        if chat_every > 0:
            for user, code in chat_examples(text):
                n_chat += 1
                if n_chat % chat_every:
                    continue
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": code}]
                ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
                parts.append(np.asarray([*ids, eos], dtype=np.int32))
        if progress is not None:
            progress(rel)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
