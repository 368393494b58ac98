"""Kimi tokenizer: tiktoken BPE + 256 special ids, injection-safe chat rendering, streaming detokenizer.

Owns everything between text and token ids (the engine sees ids only):

* loading a model directory: ``tiktoken.model`` (tiktoken text format, ``base64(token) rank`` per line),
  ``tokenizer_config.json`` (HF style: ``added_tokens_decoder``, ``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``, optional ``chat_template``) and optional ``chat_template.jinja``;
* ``encode`` / ``decode`` and the special-token table; ``StreamDecoder`` for incremental detokenization;
* chat rendering (``render_chat`` / ``apply_chat_template``) with jinja2 in a sandbox;
* ``write_tokenizer_files``, the inverse of loading (used to ship trained tokenizers).

Layout (reference §8): ids ``0 .. n_base-1`` are BPE ranks, ids ``n_base .. n_base+255`` are special, named from
``added_tokens_decoder`` or ``<|reserved_token_{id}|>``.  The HF ``TikTokenTokenizer`` builds 256+2 specials, two
of them past the 163840-row embedding and never produced; kimiq keeps exactly 256 so ``vocab_size`` matches the
model (only the literal text ``<|reserved_token_163840|>``/``...41|>`` encodes differently with specials allowed).

Deliberate differences from the HF tokenizer:

* ``encode`` defaults to ``allow_special=False``: special-token text typed by a user stays plain text.
* Chat rendering never turns user-provided strings (content, names, ids, tool arguments, tool schemas, extra
  template kwargs) into control tokens.  Every special-token substring inside them, and any fragment of one at
  a string's start or end (so two adjacent strings such as content parts ``"<|im_"`` + ``"end|>"`` cannot join
  into one), is replaced by a random ASCII marker before rendering; the special tokens left in the rendered
  output are then the template's own, and the markers are turned back into literal text encoded as plain text.
  For inputs without special-token text the ids equal HF's (render, then encode with specials allowed).
* Long inputs: split into <=400k-char pieces and <=25k-char runs of whitespace / non-whitespace like Kimi
  (tiktoken issue 195), but only *between* special tokens, so a split never cuts one in half.
* ``tiktoken.model`` is parsed here, not with ``tiktoken.load.load_tiktoken_bpe``: that function caches local
  files in ``$TMPDIR/data-gym-cache`` keyed by *path*, so a rewritten file at the same path would load stale.

Built-in chat template (``kimiq/chat_template.jinja``, used when the model directory ships none): the Kimi-K2
format of reference §8.  Choice: like the K2 template it adds the system message
``DEFAULT_SYSTEM_PROMPT`` when the first message is not a system message.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
import operator
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tiktoken
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "PAT_STR",
    "NUM_SPECIAL",
    "KIMI_SPECIAL_TOKENS",
    "DEFAULT_SYSTEM_PROMPT",
    "Tokenizer",
    "StreamDecoder",
    "builtin_chat_template",
    "load_tiktoken_model",
    "write_tokenizer_files",
]

log = logging.getLogger(__name__)

# Kimi pre-tokenizer (tokenization_kimi.py).  `&&[^\p{Han}]` is a class intersection: tiktoken's Rust
# (fancy-)regex supports it; Python `re` does not; the `regex` module needs `regex.V1`.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_SPECIAL = 256
MAX_ENCODE_CHARS = 400_000  # tiktoken handles <=400k chars without a pyo3 panic
MAX_RUN_CHARS = 25_000  # tiktoken issue 195: cap runs of whitespace / non-whitespace

# Kimi special-token layout, keyed by offset from n_base (real n_base = 163584): name, HF "special" flag.
KIMI_SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}
_NOT_SPECIAL = frozenset(name for name, special in KIMI_SPECIAL_TOKENS.values() if not special)
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
_BUILTIN_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))
_RUN = re.compile(r"\s+|\S+")


def builtin_chat_template() -> str:
    """The text of kimiq's built-in Kimi chat template."""
    return _BUILTIN_TEMPLATE.read_text(encoding="utf-8")


def load_tiktoken_model(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken text file (``base64(token) rank`` per line); ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad tiktoken line {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1} (duplicate token or gap)")
    return ranks


def _split_long(text: str) -> list[str]:
    """Kimi's long-input split: <=400k-char pieces, then runs of (non-)whitespace cut every 25k chars."""
    out: list[str] = []
    for i in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
        piece = text[i : i + MAX_ENCODE_CHARS]
        if not _LONG_RUN.search(piece):
            out.append(piece)
            continue
        start = 0  # cut at run_start + k * MAX_RUN_CHARS inside each overlong run (= Kimi's per-char loop)
        for m in _RUN.finditer(piece):
            for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                out.append(piece[start:cut])
                start = cut
        out.append(piece[start:])
    return out


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's override of jinja's tojson: no HTML escaping, unicode kept, Python json.dumps arguments.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _deep_sort(obj: Any) -> Any:
    # Kimi's apply_chat_template key-sorts tool schemas recursively before rendering.
    if isinstance(obj, Mapping):
        return {k: _deep_sort(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_deep_sort(v) for v in obj]
    return obj


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json stores tokens as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A Kimi tokenizer: ``Tokenizer.from_dir(model_dir)``."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        added_tokens: Mapping[int, tuple[str, bool]] | None = None,
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str | None = "[PAD]",
        unk_token: str | None = "[UNK]",
        chat_template: str | None = None,
        name: str = "kimi",
    ) -> None:
        """``added_tokens``: absolute id -> (name, special); ``None`` = the Kimi layout (KIMI_SPECIAL_TOKENS)."""
        n = len(mergeable_ranks)
        if n == 0 or len(set(mergeable_ranks.values())) != n or max(mergeable_ranks.values()) != n - 1:
            raise ValueError("mergeable_ranks must have ranks exactly 0..n-1")
        if added_tokens is None:
            added_tokens = {n + off: entry for off, entry in KIMI_SPECIAL_TOKENS.items()}
        self._n_base = n
        self._names: list[str] = []
        self._is_special: list[bool] = []
        for i in range(n, n + NUM_SPECIAL):
            tok_name, special = added_tokens.get(i, (f"<|reserved_token_{i}|>", True))
            self._names.append(tok_name)
            self._is_special.append(special)
        ignored = sorted(i for i in added_tokens if not n <= i < n + NUM_SPECIAL)
        if ignored:
            log.warning("ignoring added tokens outside the special range [%d, %d): %s", n, n + NUM_SPECIAL, ignored)
        self._special_tokens = {tok_name: n + j for j, tok_name in enumerate(self._names)}
        if len(self._special_tokens) != NUM_SPECIAL:
            raise ValueError("duplicate special-token names")
        self._ranks = dict(mergeable_ranks)
        self._enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self._special_tokens)
        # Longest first so that no special name shadows a longer one starting at the same position.
        self._special_re = re.compile("|".join(map(re.escape, sorted(self._special_tokens, key=len, reverse=True))))
        self._special_prefixes = frozenset(t[:k] for t in self._names for k in range(1, len(t)))
        self._special_suffixes = frozenset(t[k:] for t in self._names for k in range(1, len(t)))
        self._max_fragment = max(map(len, self._names)) - 1
        self._skip_ids = frozenset(n + j for j, s in enumerate(self._is_special) if s)
        self.bos_id: int = self._require(bos_token, "bos_token")
        self.eos_id: int = self._require(eos_token, "eos_token")
        self.pad_id: int | None = self._special_tokens.get(pad_token) if pad_token else None
        self.unk_id: int | None = self._special_tokens.get(unk_token) if unk_token else None
        self.im_end_id: int | None = self._special_tokens.get("<|im_end|>")
        self.chat_template: str = chat_template if chat_template is not None else builtin_chat_template()
        self._compiled_template: Any = None

    def _require(self, token: str, what: str) -> int:
        if token not in self._special_tokens:
            raise ValueError(f"{what} {token!r} is not a special token of this tokenizer")
        return self._special_tokens[token]

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tiktoken.model`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) from a model dir.

        Without ``tokenizer_config.json`` the Kimi special layout is assumed.  ``chat_template.jinja`` wins
        over the config's ``chat_template``; with neither, the built-in template is used.
        """
        path = Path(path)
        ranks = load_tiktoken_model(path / "tiktoken.model")
        cfg_path = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        added: dict[int, tuple[str, bool]] | None = None
        if cfg:
            added = {}
            for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
                entry = entry if isinstance(entry, Mapping) else {"content": entry}
                added[int(key)] = (str(entry["content"]), bool(entry.get("special", True)))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF multi-template form: [{"name": ..., "template": ...}]
            by_name = {t["name"]: t["template"] for t in template}
            template = by_name.get("default", next(iter(by_name.values()), None))
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            ranks,
            added,
            bos_token=_token_name(cfg.get("bos_token")) or "[BOS]",
            eos_token=_token_name(cfg.get("eos_token")) or "[EOS]",
            pad_token=_token_name(cfg.get("pad_token", "[PAD]")),
            unk_token=_token_name(cfg.get("unk_token", "[UNK]")),
            chat_template=template,
            name=path.name or "kimi",
        )

    # ---------------------------------------------------------------- vocabulary

    @property
    def n_base(self) -> int:
        """Number of BPE tokens (ids below this are mergeable ranks)."""
        return self._n_base

    @property
    def vocab_size(self) -> int:
        """BPE tokens + 256 special tokens."""
        return self._n_base + NUM_SPECIAL

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 256 special names (reserved ones included) -> id."""
        return dict(self._special_tokens)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: ``[EOS]`` and ``<|im_end|>`` (the checkpoint's config eos)."""
        return tuple(i for i in (self.eos_id, self.im_end_id) if i is not None)

    def is_special(self, token_id: int) -> bool:
        """True for ids marked ``special`` (skipped by ``decode(skip_special=True)``)."""
        return token_id in self._skip_ids

    def token_to_id(self, token: str | bytes) -> int:
        """Special name or BPE token (str as UTF-8, or raw bytes) -> id; KeyError if unknown."""
        if isinstance(token, str) and token in self._special_tokens:
            return self._special_tokens[token]
        raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        try:
            return self._ranks[raw]
        except KeyError:
            raise KeyError(f"unknown token {token!r}") from None

    def id_to_token(self, token_id: int) -> str | bytes:
        """Special id -> its name (str); BPE id -> its raw bytes."""
        if self._n_base <= token_id < self.vocab_size:
            return self._names[token_id - self._n_base]
        if 0 <= token_id < self._n_base:
            return self._enc.decode_single_token_bytes(token_id)
        raise KeyError(f"token id {token_id} outside [0, {self.vocab_size})")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token decodes to (a special token decodes to its name)."""
        tok = self.id_to_token(token_id)
        return tok.encode("utf-8") if isinstance(tok, str) else tok

    # ---------------------------------------------------------------- encode / decode

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split_long(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids, no BOS.  Special-token text becomes control ids only with ``allow_special=True``."""
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._encode_plain(text[pos : m.start()]))
            ids.append(self._special_tokens[m.group()])
            pos = m.end()
        ids.extend(self._encode_plain(text[pos:]))
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} outside [0, {self.vocab_size})")
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Ids -> text (invalid UTF-8 becomes U+FFFD).  ``skip_special`` drops ids marked special; the
        tool-call markers (``special: false``) are kept so tool calls can still be parsed."""
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream(self, *, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    # ---------------------------------------------------------------- chat

    def _template(self) -> Any:
        if self._compiled_template is None:
            self._compiled_template = _make_jinja_env().from_string(self.chat_template)
        return self._compiled_template

    def _render_segments(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None, kwargs: Mapping[str, Any],
    ) -> list[tuple[str, bool]]:
        """Render the template; return [(text, is_control)], control = a special token the template emitted."""
        # Markers are ASCII (they survive tojson, trim, ...); digits + lowercase so that a case-changing
        # filter breaks them visibly (the nonce check below) instead of restoring text in the wrong case.
        nonce = f"{secrets.randbelow(10**16):016d}"
        marker_re = re.compile(f"kq{nonce}l(\\d+)e")
        literals: list[str] = []

        def mark(text: str) -> str:
            literals.append(text)
            return f"kq{nonce}l{len(literals) - 1}e"

        def defang_str(s: str) -> str:
            # Whole special names inside the string, then fragments at its ends: a string ending in "<|im_"
            # next to one starting with "end|>" (e.g. two content parts) must not form "<|im_end|>".
            s = self._special_re.sub(lambda m: mark(m.group()), s)
            for k in range(min(len(s), self._max_fragment), 0, -1):
                if s[-k:] in self._special_prefixes:
                    s = s[:-k] + mark(s[-k:])
                    break
            for k in range(min(len(s), self._max_fragment), 0, -1):
                if s[:k] in self._special_suffixes:
                    s = mark(s[:k]) + s[k:]
                    break
            return s

        def defang(obj: Any) -> Any:
            if isinstance(obj, str):
                return defang_str(obj)
            if isinstance(obj, Mapping):
                return {defang(k): defang(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [defang(v) for v in obj]
            return obj

        context = {k: defang(v) for k, v in kwargs.items()}
        context.update(
            messages=defang(list(messages)),
            tools=defang(_deep_sort(tools)) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._names[self.bos_id - self._n_base],
            eos_token=self._names[self.eos_id - self._n_base],
            pad_token=self._names[self.pad_id - self._n_base] if self.pad_id is not None else None,
            unk_token=self._names[self.unk_id - self._n_base] if self.unk_id is not None else None,
        )
        rendered = self._template().render(**context)
        segments: list[tuple[str, bool]] = []
        pos = 0
        for m in [*self._special_re.finditer(rendered), None]:
            text = rendered[pos : m.start() if m else len(rendered)]
            text = marker_re.sub(lambda mm: literals[int(mm.group(1))], text)
            if nonce in text:
                raise ValueError("the chat template altered user text that contains special-token strings")
            if text:
                segments.append((text, False))
            if m:
                segments.append((m.group(), True))
                pos = m.end()
        return segments

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any,
    ) -> str:
        """Render a conversation to text with the chat template (``decode(apply_chat_template(...))``)."""
        segs = self._render_segments(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     kwargs=kwargs)
        return "".join(text for text, _ in segs)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any,
    ) -> list[int]:
        """Render and tokenize a conversation.  Only the template's own special tokens become control ids;
        special-token text inside messages, tools or kwargs is encoded as plain text."""
        segs = self._render_segments(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     kwargs=kwargs)
        ids: list[int] = []
        for text, control in segs:
            if control:
                ids.append(self._special_tokens[text])
            else:
                ids.extend(self._encode_plain(text))
        return ids


class StreamDecoder:
    """Incremental detokenizer: ``feed`` ids as they are generated, get back the newly completed text.

    Incomplete UTF-8 sequences are held back until completed; ``flush()`` ends the stream.  The concatenation
    of all returned pieces equals ``tokenizer.decode(ids, skip_special=...)`` exactly (including U+FFFD for
    invalid bytes), because Python's incremental UTF-8 decoder replaces errors like the one-shot decoder.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add one id (or several); return the text completed by them ("" while a character is partial)."""
        try:
            ids = self._tok._check_ids([operator.index(token_ids)])  # int, numpy int, 1-element int tensor
        except TypeError:
            ids = self._tok._check_ids(token_ids)
        data = b"".join(self._tok.token_bytes(i) for i in ids if not (self._skip_special and self._tok.is_special(i)))
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of stream: emit what is held back (an incomplete sequence becomes U+FFFD) and reset."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out


def write_tokenizer_files(
    out_dir: str | Path,
    mergeable_ranks: Mapping[bytes, int],
    special_tokens: Mapping[int, str] | None = None,
    chat_template: str | None = None,
    *,
    bos_token: str = "[BOS]",
    eos_token: str = "[EOS]",
    pad_token: str | None = "[PAD]",
    unk_token: str | None = "[UNK]",
) -> Path:
    """Write ``tiktoken.model`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) in the Kimi format.

    ``mergeable_ranks``: BPE token bytes -> rank, ranks exactly ``0..n-1`` (include all 256 single bytes so
    any text encodes).  ``special_tokens``: offset from ``n = len(mergeable_ranks)`` (0..255) -> name; default
    the Kimi layout (``KIMI_SPECIAL_TOKENS``).  Unnamed offsets become ``<|reserved_token_{id}|>`` at load.
    The tool-call markers are written with ``special: false`` as in Kimi.  ``chat_template=None`` writes no
    template file (loading then uses the built-in one; pass ``builtin_chat_template()`` to ship it).
    ``bos_token`` / ``eos_token`` (required) and ``pad_token`` / ``unk_token`` name entries of ``special_tokens``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(mergeable_ranks)
    by_rank = sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(n)):
        raise ValueError("mergeable_ranks must have ranks exactly 0..n-1")
    if special_tokens is None:
        special_tokens = {off: name for off, (name, _) in KIMI_SPECIAL_TOKENS.items()}
    if any(not 0 <= off < NUM_SPECIAL for off in special_tokens):
        raise ValueError(f"special-token offsets must be in [0, {NUM_SPECIAL})")
    if len(set(special_tokens.values())) != len(special_tokens):
        raise ValueError("duplicate special-token names")
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in by_rank]
    (out / "tiktoken.model").write_text("".join(lines), encoding="ascii")

    decoder = {
        str(n + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": name not in _NOT_SPECIAL}
        for off, name in sorted(special_tokens.items())
    }
    names = set(special_tokens.values())
    roles = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    if bos_token not in names or eos_token not in names:
        raise ValueError(f"bos_token {bos_token!r} and eos_token {eos_token!r} must be among special_tokens")
    roles = {key: tok for key, tok in roles.items() if tok in names}  # pad / unk are optional
    cfg: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [name for _, name in sorted(special_tokens.items())
                                      if name not in _NOT_SPECIAL and name not in roles.values()],
        **roles,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return out
