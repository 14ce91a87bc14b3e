"""The RWKV World tokenizer (vocabulary rwkv_vocab_v20230424): greedy longest match over UTF-8 bytes.

Three implementations share one interface (`WorldTokenizer`) and one vocabulary file:

- `impl="native"` (the default when built): our C extension `data_prep._world_tokenizer`
  (``data_prep/_world_tokenizer.c``, built in place by ``pip install -e .`` through ``setup.py``). The vocabulary,
  parsed here, becomes a double-array trie of 8-byte slots (~1 MB, built in ~15 ms); encoding walks it from each
  position, one load per byte, and emits the last id seen. `encode_flat` encodes a whole batch in one call,
  without the GIL, into one uint16 array with offsets: the tokenize stage's hot path, with no Python list per
  document. The extension starts no threads, so it is safe in forked children.
- `impl="fast"`: the Rust package `pyrwkv-tokenizer` 0.9.1, used when the extension is not built (no C compiler;
  one log line says so, `default_impl`). Both maintained Rust packages, `pyrwkv-tokenizer` 0.9.1 and
  `rwkv-tokenizer` 0.5.2, give ids identical to the reference and run at the same speed; we wrap
  `pyrwkv-tokenizer` because it is the newer release of the same author's code, is Apache-2.0 licensed, and
  has a multi-threaded `encode_batch`.
- `impl="reference"`: pure Python, written here from the vocabulary file's definition. A byte trie finds the
  longest vocabulary entry (at most 128 bytes) at each position. Slow, but obviously right: tests check the
  others against it.

Why our own: the tokenize stage (read zstd and JSON, tokenize, write shards) must reach 35 MB/s of text per core
at 1 and 2 processes. With the Rust packages the tokenizer takes most of the stage's time and the stage stays
below that target, and the packages offer no faster path (their batch call only adds threads). The native
tokenizer makes the stage about three times faster; figures in bench/NOTES.md (`bench/tokenizer.py`,
`bench/data_pipeline.py`).

Gotchas of the Rust package, and what this module does about them:

- Its `encode_batch` starts a thread pool; a child forked after that hangs on its next batch call. Processes
  that tokenize in parallel with it must use the ``spawn`` start method. As a safety net, `encode_batch` notices
  that it runs in a forked child of a process that used the pool and encodes one text at a time instead.
- Its `decode` panics (`BaseException`) on ids whose bytes are not valid UTF-8 on their own, and on ids past
  the vocabulary. We never call it: decoding is a join over our own byte table, with invalid UTF-8 replaced.

A lone surrogate (e.g. ``"\\ud800"``, which JSON may carry) has no UTF-8 encoding, so no implementation can
tokenize it. All raise `TokenizationError` with the character position (`encode_flat` lists the text and goes
on), so the tokenization stage can count such documents and go on.

Token ids: 1..65529 are vocabulary entries (1..256 are the single bytes 0x00..0xFF), 0 is end of document
(`eod_id`), 65530..65535 are unused padding up to `vocab_size` (65536 ids fit uint16 exactly).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

from data_prep.errors import TokenizationError, TokenizerError

__all__ = [
    "DEFAULT_VOCAB_PATH",
    "EOD_ID",
    "MAX_TOKEN_BYTES",
    "VOCAB_SIZE",
    "Vocab",
    "WorldTokenizer",
    "ReferenceTokenizer",
    "FastTokenizer",
    "NativeTokenizer",
    "FlatIds",
    "default_impl",
    "load_tokenizer",
    "read_vocab",
]

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_PATH = Path(__file__).parent / "assets" / "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536
EOD_ID = 0
MAX_TOKEN_BYTES = 128
IMPLEMENTATIONS = ("native", "fast", "reference")
NATIVE_MODULE = "data_prep._world_tokenizer"


@dataclass(frozen=True)
class Vocab:
    """A vocabulary file, identified cheaply; its entries are parsed on first use of `tokens`.

    Args:
        path: the file.
        name: the file name without suffix, e.g. ``rwkv_vocab_v20230424``.
        fingerprint: ``<name>-sha256:<16 hex>`` over the file with line endings normalised to LF, so copies that
            differ only in CRLF vs LF (the RWKV-LM file vs the one inside the Rust wheels) get the same value.
        n_entries: number of entry lines (65529 for rwkv_vocab_v20230424).
    """

    path: Path
    name: str
    fingerprint: str
    n_entries: int

    @property
    def tokens(self) -> tuple[bytes, ...]:
        """``tokens[i]`` is the byte string of id i; ``tokens[0] == b""`` (end of document).

        Raises:
            TokenizerError: a line is malformed, duplicated, out of range or has a byte length that does not
                match its literal; the message names the file and line.
        """
        return _parse_vocab(self.path)


@functools.lru_cache(maxsize=4)
def read_vocab(path: str | Path = DEFAULT_VOCAB_PATH) -> Vocab:
    """Identify a vocabulary file: one entry per line, ``<id> <Python str or bytes literal> <byte length>``.

    Parsing the entries takes about a second, so it waits until something needs them (`Vocab.tokens`).

    Args:
        path: the vocabulary file. Default: the copy shipped in ``data_prep/assets``.

    Returns:
        The `Vocab` (cached per path: every tokenizer of a process shares one table).

    Raises:
        TokenizerError: the file is missing or unreadable.
    """
    path = Path(path)
    normalised = _read_normalised(path)
    digest = hashlib.sha256(normalised).hexdigest()[:16]
    name = path.name.split(".")[0]
    n_entries = sum(1 for line in normalised.split(b"\n") if line)
    return Vocab(path=path, name=name, fingerprint=f"{name}-sha256:{digest}", n_entries=n_entries)


def _read_normalised(path: Path) -> bytes:
    try:
        return path.read_bytes().replace(b"\r\n", b"\n")
    except OSError as exc:
        raise TokenizerError(f"cannot read vocabulary file {path}: {exc.strerror or exc}") from exc


@functools.lru_cache(maxsize=4)
def _parse_vocab(path: Path) -> tuple[bytes, ...]:
    by_id: dict[int, bytes] = {}
    for lineno, line in enumerate(_read_normalised(path).decode("utf-8").split("\n"), start=1):
        if not line:
            continue
        token_id, token = _parse_vocab_line(path, lineno, line)
        if token_id in by_id:
            raise TokenizerError(f"{path}:{lineno}: id {token_id} appears twice")
        by_id[token_id] = token
    if not by_id:
        raise TokenizerError(f"vocabulary file {path} has no entries")
    top = max(by_id)
    missing = [i for i in range(1, top + 1) if i not in by_id]
    if missing:
        raise TokenizerError(f"vocabulary file {path} has no entry for ids {missing[:5]} (ids must be 1..{top})")
    return (b"",) + tuple(by_id[i] for i in range(1, top + 1))


def _parse_vocab_line(path: Path, lineno: int, line: str) -> tuple[int, bytes]:
    # The literal may contain spaces, so the id is before the first space and the length after the last.
    first, last = line.find(" "), line.rfind(" ")
    try:
        if first <= 0 or last <= first:
            raise ValueError("expected '<id> <literal> <length>'")
        token_id, length = int(line[:first]), int(line[last + 1 :])
        literal = ast.literal_eval(line[first + 1 : last])
        token = literal.encode("utf-8") if isinstance(literal, str) else literal
        if not isinstance(token, bytes):
            raise ValueError(f"literal is a {type(literal).__name__}, not str or bytes")
    except (ValueError, SyntaxError, UnicodeEncodeError) as exc:
        raise TokenizerError(f"{path}:{lineno}: malformed vocabulary line {line[:80]!r}: {exc}") from exc
    if not 1 <= token_id < VOCAB_SIZE:
        raise TokenizerError(f"{path}:{lineno}: id {token_id} is outside 1..{VOCAB_SIZE - 1}")
    if len(token) != length or not 1 <= length <= MAX_TOKEN_BYTES:
        raise TokenizerError(
            f"{path}:{lineno}: entry {token!r} has {len(token)} bytes, the line says {length} "
            f"(must be 1..{MAX_TOKEN_BYTES})"
        )
    return token_id, token


def _encode_error(exc: UnicodeEncodeError, index: int | None = None) -> TokenizationError:
    where = "" if index is None else f" of text {index} in the batch"
    char = exc.object[exc.start] if isinstance(exc.object, str) and exc.start < len(exc.object) else "?"
    return TokenizationError(
        f"text is not encodable as UTF-8: character U+{ord(char):04X} at position {exc.start}{where} "
        f"({exc.reason})",
        position=exc.start,
        index=index,
    )


class FlatIds(NamedTuple):
    """Token ids of a batch of texts in one array (`WorldTokenizer.encode_flat`).

    Args:
        ids: ``(tokens,)`` uint16, every encodable text's ids in order, each followed by the end-of-document id
            when asked for.
        offsets: ``(len(texts) + 1,)`` int64; text i is ``ids[offsets[i]:offsets[i + 1]]`` (empty for a text
            that could not be encoded).
        errors: ``(index, character position)`` of each text holding a lone surrogate, in order.
        text_bytes: UTF-8 bytes of the texts encoded (those in `errors` not counted).
    """

    ids: np.ndarray
    offsets: np.ndarray
    errors: list[tuple[int, int]]
    text_bytes: int


class WorldTokenizer:
    """Common interface and decoding of the implementations; use `load_tokenizer` to get one.

    Instances pickle as (vocabulary path, implementation), so they can be handed to ``spawn`` workers, which
    rebuild them.

    Args:
        vocab: the parsed vocabulary.
    """

    impl = "base"
    vocab_size = VOCAB_SIZE
    eod_id = EOD_ID

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab

    @property
    def name(self) -> str:
        """The vocabulary's name, e.g. ``rwkv_vocab_v20230424``."""
        return self._vocab.name

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary (not the implementation): shards record it, loaders compare it."""
        return self._vocab.fingerprint

    @property
    def vocab_path(self) -> Path:
        return self._vocab.path

    def __reduce__(self):
        return (load_tokenizer, (str(self._vocab.path), self.impl))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint!r}, impl={self.impl!r})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document id appended).

        Raises:
            TokenizationError: the text holds a lone surrogate; ``position`` is its character index.
        """
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text.

        Raises:
            TokenizationError: a text holds a lone surrogate; ``index`` says which text, ``position`` where.
        """
        out = []
        for index, text in enumerate(texts):
            try:
                out.append(self.encode(text))
            except TokenizationError as exc:
                raise TokenizationError(f"{exc} (text {index} in the batch)", exc.position, index) from None
        return out

    def encode_flat(self, texts: Sequence[str], eod: bool = True) -> FlatIds:
        """Ids of every text in one uint16 array, for bulk work (the tokenize stage): no list per text.

        A text that cannot be encoded (lone surrogate) is listed in `FlatIds.errors` and skipped; the others
        are still encoded.

        Args:
            texts: the texts.
            eod: append the end-of-document id 0 after each encoded text. Default: True.
        """
        import numpy as np

        tail = [EOD_ID] if eod else []
        chunks, offsets, errors, total, text_bytes = [], [0], [], 0, 0
        for index, text in enumerate(texts):
            try:
                ids = self.encode(text) + tail
            except TokenizationError as exc:
                errors.append((index, exc.position))
            else:
                chunks.append(np.array(ids, dtype=np.uint16))
                total += len(ids)
                text_bytes += len(text) if text.isascii() else len(text.encode("utf-8"))
            offsets.append(total)
        ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
        return FlatIds(ids, np.array(offsets, dtype=np.int64), errors, text_bytes)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes that `ids` stand for.

        Id 0 (end of document) and the padding ids 65530..65535 stand for no bytes: an untrained model can sample
        them, and generation must not fail on that.

        Args:
            ids: token ids, a sequence of ints or a numpy integer array.

        Raises:
            TokenizationError: an id is not an int in 0..65535; ``position`` is its index in `ids`.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        table = self._decode_table
        try:
            # A negative id would index from the end of the table instead of failing.
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(p for p, i in enumerate(ids) if not (isinstance(i, int) and 0 <= i < VOCAB_SIZE))
            raise TokenizationError(
                f"token id {ids[bad]!r} at position {bad} is not an int in 0..{VOCAB_SIZE - 1}", bad
            ) from None

    @functools.cached_property
    def _decode_table(self) -> list[bytes]:
        return list(self._vocab.tokens) + [b""] * (VOCAB_SIZE - len(self._vocab.tokens))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD, never an error.

        Raises:
            TokenizationError: an id is outside 0..65535.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ReferenceTokenizer(WorldTokenizer):
    """Pure-Python greedy longest match over a byte trie.

    Trie nodes are dicts ``{byte: (token id or 0, child node or None)}``: walking from the root along the text's
    bytes visits every vocabulary entry that starts at the current position, and the last id seen is the
    longest match. Every single byte is an entry, so each step consumes at least one byte.
    """

    impl = "reference"

    def __init__(self, vocab: Vocab) -> None:
        super().__init__(vocab)
        self._root = _build_trie(vocab.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _encode_error(exc) from None
        root = self._root
        out: list[int] = []
        i, n = 0, len(data)
        while i < n:
            node, j = root, i
            best_id, best_end = 0, i
            # No entry is longer than MAX_TOKEN_BYTES, so the walk never needs more bytes than that.
            for byte in data[i : i + MAX_TOKEN_BYTES]:
                entry = node.get(byte)
                if entry is None:
                    break
                j += 1
                if entry[0]:
                    best_id, best_end = entry[0], j
                node = entry[1]
                if node is None:
                    break
            out.append(best_id)
            i = best_end
        return out


@functools.lru_cache(maxsize=2)
def _build_trie(tokens: tuple[bytes, ...]) -> dict:
    root: dict = {}
    for token_id in range(1, len(tokens)):
        token = tokens[token_id]
        node = root
        for byte in token[:-1]:
            # A prefix of an entry need not be an entry itself: such nodes carry id 0.
            child_id, child = node.get(byte, (0, None))
            if child is None:
                child = {}
                node[byte] = (child_id, child)
            node = child
        node[token[-1]] = (token_id, node.get(token[-1], (0, None))[1])
    return root


class FastTokenizer(WorldTokenizer):
    """`pyrwkv-tokenizer` (Rust) for encoding; decoding through the shared byte table.

    The Rust side reads the same vocabulary file. ``vocab_size()`` there counts ids 0..65529; a mismatch with
    the file's entry count means a different file format and is refused. Our own parse of the file happens only
    when something is decoded.
    """

    impl = "fast"

    def __init__(self, vocab: Vocab) -> None:
        super().__init__(vocab)
        try:
            import pyrwkv_tokenizer
        except ImportError as exc:
            raise TokenizerError(
                "impl='fast' needs the package pyrwkv-tokenizer==0.9.1 (pip install pyrwkv-tokenizer==0.9.1), "
                "or use impl='reference'"
            ) from exc
        self._rust = pyrwkv_tokenizer.WorldTokenizer(str(vocab.path))
        if self._rust.vocab_size() != vocab.n_entries + 1:
            raise TokenizerError(
                f"pyrwkv-tokenizer read {self._rust.vocab_size()} ids from {vocab.path}, the file has "
                f"{vocab.n_entries} entries plus id 0: the file format is not what both expect"
            )
        self._batch_pid: int | None = None

    def encode(self, text: str) -> list[int]:
        try:
            return self._rust.encode(text)
        except UnicodeEncodeError as exc:
            raise _encode_error(exc) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._batch_pid is not None and self._batch_pid != os.getpid():
            # A forked child of a process whose Rust thread pool is running would hang in encode_batch.
            return super().encode_batch(texts)
        self._batch_pid = os.getpid()
        try:
            return self._rust.encode_batch(texts)
        except UnicodeEncodeError:
            # The batch call does not say which text failed; the one-at-a-time path does.
            return super().encode_batch(texts)


class NativeTokenizer(WorldTokenizer):
    """Our C extension `data_prep._world_tokenizer` (``data_prep/_world_tokenizer.c``): a double-array trie over
    the vocabulary parsed here, built in ~15 ms; decoding through the shared byte table.

    `encode_flat` is one C call for the whole batch, without the GIL, and returns the ids as one uint16 array.
    The extension starts no threads, so forked children are safe.
    """

    impl = "native"

    def __init__(self, vocab: Vocab) -> None:
        super().__init__(vocab)
        try:
            module = importlib.import_module(NATIVE_MODULE)
        except ImportError as exc:
            raise TokenizerError(
                f"impl='native' needs the C extension {NATIVE_MODULE}, which is not built here ({exc}); build it "
                "with `pip install -e . --no-deps` (needs a C compiler), or use impl='fast'"
            ) from exc
        self._encoder = _native_encoder(module, vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return self._encoder.encode(text)
        except UnicodeEncodeError as exc:
            raise _encode_error(exc) from None

    def encode_flat(self, texts: Sequence[str], eod: bool = True) -> FlatIds:
        import numpy as np

        ids, offsets, errors, text_bytes = self._encoder.encode_batch(texts, EOD_ID if eod else -1)
        return FlatIds(np.frombuffer(ids, dtype=np.uint16), np.frombuffer(offsets, dtype=np.int64), errors,
                       text_bytes)


@functools.lru_cache(maxsize=4)
def _native_encoder(module, vocab: Vocab):
    try:
        return module.Encoder(vocab.tokens)
    except ValueError as exc:
        raise TokenizerError(f"vocabulary file {vocab.path}: {exc}") from exc


@functools.cache
def default_impl() -> str:
    """``"native"`` when the C extension is importable, else ``"fast"`` (said once per process in a log line)."""
    try:
        importlib.import_module(NATIVE_MODULE)
    except ImportError as exc:
        logger.warning("tokenizer: the C extension %s is not built (%s); using impl='fast' (pyrwkv-tokenizer, "
                       "slower); `pip install -e . --no-deps` builds it", NATIVE_MODULE, exc)
        return "fast"
    return "native"


def load_tokenizer(vocab_path: str | Path | None = None, impl: str | None = None) -> WorldTokenizer:
    """Build the RWKV World tokenizer.

    Args:
        vocab_path: vocabulary file. Default: ``data_prep/assets/rwkv_vocab_v20230424.txt`` (shipped).
        impl: ``"native"`` (our C extension, for real work), ``"fast"`` (the Rust package pyrwkv-tokenizer) or
            ``"reference"`` (pure Python, for checking). Default: None, meaning `default_impl()`: native when
            the extension is built, else fast.

    Returns:
        A `WorldTokenizer`; all implementations give identical ids and the same `fingerprint`.

    Raises:
        TokenizerError: unknown `impl`, unreadable or malformed vocabulary, missing extension or Rust package.
    """
    impl = default_impl() if impl is None else impl
    if impl not in IMPLEMENTATIONS:
        raise TokenizerError(f"tokenizer impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    vocab = read_vocab(Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH)
    classes = {"native": NativeTokenizer, "fast": FastTokenizer, "reference": ReferenceTokenizer}
    return classes[impl](vocab)
