"""Streaming reader of SlimPajama `.jsonl.zst` files: every zstd frame, one JSON document per line.

`zstandard`'s `stream_reader` returns a truncated file's decompressed prefix without any error, so this module
walks the frames itself with one decompression object per frame and reports a file whose last frame never
ends (`TruncatedInputError`). Lines are parsed one by one; a bad line is returned as a `BadLine` (kind and
line number) instead of raising, so a caller can count bad lines per file and keep going.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from data_prep.errors import InputReadError, TruncatedInputError

try:  # orjson parses SlimPajama lines ~3x faster than the standard library, which stays the fallback.
    import orjson

    _fast_loads = orjson.loads
    _FAST_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - orjson is a dependency; this keeps the reader usable without it
    _fast_loads = json.loads
    _FAST_ERRORS = (ValueError,)

__all__ = [
    "BAD_LINE_KINDS",
    "BadLine",
    "Document",
    "iter_documents",
    "iter_lines",
]

# Kinds of bad lines, in report order. `unencodable` is decided by the tokenizer, not here.
BAD_LINE_KINDS = ("invalid_json", "missing_text", "empty", "unencodable")
UNKNOWN_SOURCE = "unknown"
_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Document:
    """One good line.

    Args:
        line: 1-based line number in the decompressed file.
        text: the `text` field.
        source: `meta.redpajama_set_name`, or "unknown" when absent.
        size: bytes of the raw JSON line (for throughput accounting).
    """

    line: int
    text: str
    source: str
    size: int


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not a usable document.

    Args:
        line: 1-based line number.
        kind: one of `BAD_LINE_KINDS`.
        detail: a short reason.
        size: bytes of the raw line.
    """

    line: int
    kind: str
    detail: str
    size: int


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield `(line number, raw line)` of a `.jsonl.zst` file over all of its zstd frames.

    Blank lines are skipped (their numbers still count). The last line may lack a newline.

    Raises:
        TruncatedInputError: the file ends inside a frame.
        InputReadError: the file cannot be opened or read, or holds invalid zstd data.
    """
    dctx = zstandard.ZstdDecompressor()
    lineno = 0
    rest = b""
    try:
        with open(path, "rb") as fh:
            frame = dctx.decompressobj()
            in_frame = False  # True once the current frame has received bytes and not yet ended
            while block := fh.read(_READ_BYTES):
                out = []
                while block:
                    out.append(frame.decompress(block))
                    in_frame = True
                    if frame.eof:
                        block = frame.unused_data
                        frame = dctx.decompressobj()
                        in_frame = False
                    else:
                        block = b""
                data = rest + b"".join(out)
                lines = data.split(b"\n")
                rest = lines.pop()
                for line in lines:
                    lineno += 1
                    if line.strip():
                        yield lineno, line
    except zstandard.ZstdError as exc:
        raise InputReadError(f"{path}: invalid zstd data after line {lineno}: {exc}") from None
    except OSError as exc:
        raise InputReadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if in_frame:
        raise TruncatedInputError(f"{path}: truncated zstd frame after line {lineno} (incomplete download?)")
    if rest.strip():
        yield lineno + 1, rest


def _parse(lineno: int, raw: bytes) -> Document | BadLine:
    try:
        obj = _fast_loads(raw)
    except _FAST_ERRORS:
        # orjson refuses lone surrogates that the JSON grammar allows ("\ud800"); the standard library keeps
        # them, so the tokenizer can report such text as unencodable rather than as broken JSON.
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            return BadLine(lineno, "invalid_json", str(exc)[:120], len(raw))
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return BadLine(lineno, "missing_text", "no string field 'text'", len(raw))
    text = obj["text"]
    if not text:
        return BadLine(lineno, "empty", "empty text", len(raw))
    meta = obj.get("meta")
    source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return Document(lineno, text, source if isinstance(source, str) and source else UNKNOWN_SOURCE, len(raw))


def iter_documents(path: str | os.PathLike) -> Iterator[Document | BadLine]:
    """Yield each non-blank line of a `.jsonl.zst` file as a `Document` or a `BadLine`.

    Raises:
        TruncatedInputError, InputReadError: as `iter_lines`, after yielding the lines read before the damage.
    """
    for lineno, raw in iter_lines(path):
        yield _parse(lineno, raw)
