"""Atomic file writes for every layer: readers see the old file or the new one, never a partial one.

It lives in `data_prep`, the lowest layer that writes files, so `rwkv5`, `flows` and the app share it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_MARK", "atomic_path", "atomic_write_bytes", "atomic_write_text"]

TEMP_MARK = ".tmp-"
"""In the name of every temporary file `atomic_path` makes; directory scanners skip names holding it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds.

    The temporary name is hidden (a leading dot) and unique per call, so listings and concurrent writers
    (other processes or threads) never pick it up; a crash leaves the previous file in place and the temporary one removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
