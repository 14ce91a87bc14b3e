"""Token shards: uncompressed Arrow IPC files of uint16 ids, and the dataset manifest that indexes them.

Layout of a dataset directory:

    manifest.json                      written last and atomically; lists every shard (path, sha256, counts)
    <prefix>-00000.arrow               one shard; <prefix> may contain folders (e.g. train/chunk1/example_train_0)

A shard is an Arrow IPC *file* (not stream, no compression, so it memory-maps and reads zero-copy) with one
non-nullable `tokens: uint16` column. It holds one record batch per source (`redpajama_set_name`), sorted by
source name, so each source's tokens are one contiguous buffer: the loader slices windows out of it without
copying and can weight sources against each other. Documents are concatenated, each ending with the
end-of-document id 0. The schema metadata (key `rwkv5.shard`) records the tokenizer fingerprint, dtype, the
source files and the document and token counts of every batch, so a shard describes itself even without the
manifest.

Readers open only shards that the manifest lists (a stray `.arrow` file in the folder is never read) and
compare each shard's own metadata with its manifest entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.atomic import atomic_write_text
from data_prep.errors import ShardError, TokenizerMismatchError

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "EOD_ID",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "SHARD_SUFFIX",
    "DatasetManifest",
    "OpenShard",
    "Segment",
    "ShardInfo",
    "ShardWriter",
    "file_sha256",
    "open_shard",
    "read_manifest",
    "verify_dataset",
    "write_manifest",
    "write_token_dataset",
]

EOD_ID = 0
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_SUFFIX = ".arrow"
# 32 Mi tokens = 64 MiB per shard: about one SlimPajama input file (~60 MB of text, ~15M tokens) per shard,
# large enough that per-file overhead vanishes, small enough to write from one worker's memory.
DEFAULT_SHARD_TOKENS = 1 << 25

_META_KEY = b"rwkv5.shard"
_SHARD_FORMAT = "rwkv5-token-shard"
_MANIFEST_FORMAT = "rwkv5-token-dataset"
_DTYPE = "uint16"
_SCHEMA_FIELD = pa.field("tokens", pa.uint16(), nullable=False)


@dataclass(frozen=True)
class Segment:
    """One record batch of a shard: the concatenated documents of one source.

    Args:
        source: the `redpajama_set_name` (or any label) of every document in the batch.
        documents: number of documents, equal to the number of end-of-document ids in the batch.
        tokens: number of token ids, end-of-document ids included.
    """

    source: str
    documents: int
    tokens: int

    def to_json(self) -> dict:
        return {"source": self.source, "documents": self.documents, "tokens": self.tokens}

    @classmethod
    def from_json(cls, obj: dict) -> Segment:
        return cls(source=str(obj["source"]), documents=int(obj["documents"]), tokens=int(obj["tokens"]))


@dataclass(frozen=True)
class ShardInfo:
    """A manifest entry: where a shard is, how to verify it, and what it holds.

    Args:
        path: POSIX path relative to the dataset directory.
        sha256: hex digest of the whole file.
        bytes: file size.
        segments: the shard's record batches in file order.
        source_files: the input files its documents came from (relative names, for provenance).
    """

    path: str
    sha256: str
    bytes: int
    segments: tuple[Segment, ...]
    source_files: tuple[str, ...] = ()

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.segments)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "documents": self.documents,
            "tokens": self.tokens,
            "segments": [s.to_json() for s in self.segments],
            "source_files": list(self.source_files),
        }

    @classmethod
    def from_json(cls, obj: dict) -> ShardInfo:
        return cls(
            path=str(obj["path"]),
            sha256=str(obj["sha256"]),
            bytes=int(obj["bytes"]),
            segments=tuple(Segment.from_json(s) for s in obj["segments"]),
            source_files=tuple(str(f) for f in obj.get("source_files", ())),
        )


@dataclass(frozen=True)
class DatasetManifest:
    """The parsed `manifest.json` of a token dataset.

    Args:
        root: the dataset directory (shard paths are relative to it).
        tokenizer: fingerprint of the tokenizer that wrote every shard.
        shards: the shards in dataset order; the loader's token streams follow this order.
        dtype: token dtype name. Default: `"uint16"`.
        eod_id: the end-of-document id appended after each document. Default: 0.
        extra: free-form fields the writer added (e.g. the tokenize stage's summary).
    """

    root: Path
    tokenizer: str
    shards: tuple[ShardInfo, ...]
    dtype: str = _DTYPE
    eod_id: int = EOD_ID
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def by_source(self) -> dict[str, dict[str, int]]:
        """Documents and tokens per source, sources sorted by name."""
        out: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            for seg in shard.segments:
                entry = out.setdefault(seg.source, {"documents": 0, "tokens": 0})
                entry["documents"] += seg.documents
                entry["tokens"] += seg.tokens
        return dict(sorted(out.items()))

    @property
    def digest(self) -> str:
        """sha256 over the tokenizer and the shard list: identifies the dataset's content and order."""
        canonical = json.dumps(
            {"tokenizer": self.tokenizer, "shards": [s.to_json() for s in self.shards]},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> dict:
        return {
            "format": _MANIFEST_FORMAT,
            "version": self.version,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "eod_id": self.eod_id,
            "totals": {
                "shards": len(self.shards),
                "documents": self.documents,
                "tokens": self.tokens,
                "bytes": sum(s.bytes for s in self.shards),
                "by_source": self.by_source,
            },
            "shards": [s.to_json() for s in self.shards],
            **({"extra": self.extra} if self.extra else {}),
        }


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_documents(tokens: np.ndarray, documents: int, where: str) -> np.ndarray:
    """Return `tokens` as uint16, checking it is `documents` whole documents (each ends with the only id 0)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ShardError(f"{where}: documents must be a non-empty 1-D array, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() > 0xFFFF:
            raise ShardError(f"{where}: document ids must fit uint16, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.uint16)
    if tokens[-1] != EOD_ID or np.count_nonzero(tokens == EOD_ID) != documents:
        raise ShardError(
            f"{where}: expected {documents} document(s), each ending with the only end-of-document id "
            f"{EOD_ID}; got {np.count_nonzero(tokens == EOD_ID)} such ids, last id {tokens[-1]}"
        )
    return tokens


class ShardWriter:
    """Writes documents into shards of about `shard_tokens` tokens; a context manager.

    Shards are written under temporary names and renamed to their final names only by `commit()` (called by
    `__exit__` when no exception is in flight), so an interrupted or failed writer leaves no partial shard
    under a final name. Output bytes are a pure function of the documents added, their sources and the
    constructor arguments: re-running the same input gives byte-identical shards.

    Args:
        out_dir: dataset directory.
        prefix: relative POSIX path prefix of the shard names; shard k is `<prefix>-<k:05d>.arrow`.
        tokenizer_fingerprint: recorded in every shard's metadata.
        shard_tokens: a shard is cut once it holds at least this many tokens (documents are never split);
            None cuts only on `flush_shard()`, for callers that decide the cuts themselves. Default:
            `DEFAULT_SHARD_TOKENS`.
        source_files: input files recorded in every shard's metadata.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        tokenizer_fingerprint: str,
        shard_tokens: int | None = DEFAULT_SHARD_TOKENS,
        source_files: Sequence[str] = (),
    ) -> None:
        if shard_tokens is not None and shard_tokens < 1:
            raise ShardError(f"{out_dir}: shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.shard_tokens = shard_tokens
        self.source_files = tuple(source_files)
        self._pending: dict[str, tuple[list[np.ndarray], list[int]]] = {}
        self._pending_tokens = 0
        self._written: list[tuple[Path, ShardInfo]] = []
        self._committed: list[ShardInfo] | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add(self, tokens: np.ndarray, source: str) -> None:
        """Append one document (ids ending with the end-of-document id 0, the only 0) from `source`."""
        self.add_many(tokens, 1, source)

    def add_many(self, tokens: np.ndarray, documents: int, source: str) -> None:
        """Append `documents` consecutive documents at once (one flat array, each ending with id 0).

        The tokenize stage builds one flat array per batch of documents; this saves a call per document.
        """
        where = f"{self.out_dir}/{self.prefix}"
        if self._committed is not None:
            raise ShardError(f"{where}: writer already committed")
        tokens = _check_documents(tokens, documents, where)
        arrays, counts = self._pending.setdefault(source, ([], []))
        arrays.append(tokens)
        counts.append(documents)
        self._pending_tokens += tokens.size
        if self.shard_tokens is not None and self._pending_tokens >= self.shard_tokens:
            self.flush_shard()

    def flush_shard(self) -> ShardInfo | None:
        """Write the pending documents as one shard (under a temporary name); None if nothing is pending."""
        if not self._pending:
            return None
        index = len(self._written)
        rel = f"{self.prefix}-{index:05d}{SHARD_SUFFIX}"
        final = self.out_dir / rel
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        segments = []
        arrays = []
        for source in sorted(self._pending):
            parts, counts = self._pending[source]
            flat = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
            segments.append(Segment(source, sum(counts), int(flat.size)))
            arrays.append(flat)
        meta = {
            "format": _SHARD_FORMAT,
            "version": MANIFEST_VERSION,
            "tokenizer": self.tokenizer_fingerprint,
            "dtype": _DTYPE,
            "eod_id": EOD_ID,
            "segments": [s.to_json() for s in segments],
            "source_files": list(self.source_files),
        }
        schema = pa.schema([_SCHEMA_FIELD], metadata={_META_KEY: json.dumps(meta, sort_keys=True).encode()})
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for flat in arrays:
                # from_buffers wraps the array without a copy (and without pa.array's lazy pandas import).
                column = pa.Array.from_buffers(pa.uint16(), flat.size, [None, pa.py_buffer(flat)])
                writer.write_batch(pa.record_batch([column], schema=schema))
        info = ShardInfo(rel, file_sha256(tmp), tmp.stat().st_size, tuple(segments), self.source_files)
        self._written.append((tmp, info))
        self._pending = {}
        self._pending_tokens = 0
        return info

    def commit(self) -> list[ShardInfo]:
        """Flush the last shard and move every shard to its final name; returns their manifest entries."""
        if self._committed is not None:
            return self._committed
        self.flush_shard()
        for tmp, info in self._written:
            os.replace(tmp, self.out_dir / info.path)
        self._committed = [info for _, info in self._written]
        return self._committed

    def abort(self) -> None:
        """Delete every shard written so far under a temporary name; nothing reaches a final name."""
        for tmp, _ in self._written:
            tmp.unlink(missing_ok=True)
        self._written = []
        self._pending = {}
        self._pending_tokens = 0


def write_manifest(
    out_dir: str | os.PathLike,
    tokenizer_fingerprint: str,
    shards: Iterable[ShardInfo],
    extra: dict | None = None,
) -> Path:
    """Write `manifest.json` atomically, after the shards it lists exist. Returns its path.

    An identical manifest already there is left untouched: a re-run that found nothing to do changes no file
    (the pipeline's re-run check, and anything syncing the dataset, goes by modification times)."""
    manifest = DatasetManifest(Path(out_dir), tokenizer_fingerprint, tuple(shards), extra=dict(extra or {}))
    seen: set[str] = set()
    for info in manifest.shards:
        if info.path in seen:
            raise ShardError(f"{manifest.path}: shard {info.path} would be listed twice; two inputs wrote "
                             "the same shard name, so one of them was overwritten")
        seen.add(info.path)
    text = json.dumps(manifest.to_json(), indent=1) + "\n"
    try:
        unchanged = manifest.path.read_text(encoding="utf-8") == text
    except (FileNotFoundError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        atomic_write_text(manifest.path, text)
    return manifest.path


def write_token_dataset(
    out_dir: str | os.PathLike,
    documents: Iterable[np.ndarray],
    tokenizer_fingerprint: str,
    source: str = "synthetic",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> Path:
    """Write already-tokenized documents as a dataset (shards, then the manifest); returns the manifest path.

    Meant for tests and small synthetic data; the tokenize stage writes real corpora.

    Args:
        out_dir: dataset directory (created).
        documents: uint16 arrays, each ending with the end-of-document id 0.
        tokenizer_fingerprint: the fingerprint of the tokenizer that produced the ids.
        source: the source label of every document. Default: `"synthetic"`.
        shard_tokens: target shard size in tokens. Default: `DEFAULT_SHARD_TOKENS`.
    """
    with ShardWriter(out_dir, "part", tokenizer_fingerprint, shard_tokens) as writer:
        for doc in documents:
            writer.add(doc, source)
    return write_manifest(out_dir, tokenizer_fingerprint, writer.commit())


def read_manifest(data_dir: str | os.PathLike) -> DatasetManifest:
    """Parse and check `data_dir/manifest.json`.

    Raises:
        ShardError: the manifest is missing, not JSON, of another format or version, or lists an unsafe path.
    """
    root = Path(data_dir)
    path = root / MANIFEST_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: no dataset manifest (was the tokenize stage run to completion?)") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable dataset manifest: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != _MANIFEST_FORMAT:
        raise ShardError(f"{path}: not a token dataset manifest (format {obj.get('format')!r})")
    if obj.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {obj.get('version')!r}, this reader knows {MANIFEST_VERSION}")
    if obj.get("dtype") != _DTYPE or obj.get("eod_id") != EOD_ID:
        raise ShardError(f"{path}: dtype {obj.get('dtype')!r} / eod_id {obj.get('eod_id')!r} not uint16 / 0")
    try:
        shards = tuple(ShardInfo.from_json(s) for s in obj["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{path}: malformed shard entry: {exc!r}") from None
    for shard in shards:
        if Path(shard.path).is_absolute() or ".." in Path(shard.path).parts:
            raise ShardError(f"{path}: shard path {shard.path!r} escapes the dataset directory")
    return DatasetManifest(root, str(obj["tokenizer"]), shards, extra=dict(obj.get("extra", {})))


@dataclass(frozen=True)
class OpenShard:
    """A memory-mapped shard: one read-only zero-copy uint16 array per segment.

    Args:
        path: the shard file.
        meta: its parsed schema metadata.
        arrays: `(tokens,)` uint16 views, one per record batch, in file order.
    """

    path: Path
    meta: dict
    arrays: tuple[np.ndarray, ...]


def open_shard(path: str | os.PathLike, expected_tokenizer: str | None = None) -> OpenShard:
    """Memory-map a shard and check its metadata.

    Raises:
        TokenizerMismatchError: the shard's tokenizer fingerprint is not `expected_tokenizer`.
        ShardError: the file is missing, not an Arrow IPC file, or its metadata or layout is wrong.
    """
    path = Path(path)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        raw = (reader.schema.metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else None
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ShardError(f"{path}: not a readable Arrow IPC shard: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != _SHARD_FORMAT:
        raise ShardError(f"{path}: Arrow file without rwkv5 shard metadata")
    if expected_tokenizer is not None and meta.get("tokenizer") != expected_tokenizer:
        raise TokenizerMismatchError(
            f"{path}: written by tokenizer {meta.get('tokenizer')!r}, expected {expected_tokenizer!r}"
        )
    if reader.schema.types != [pa.uint16()] or meta.get("dtype") != _DTYPE:
        raise ShardError(f"{path}: expected one uint16 column, got {reader.schema}")
    arrays = []
    for i in range(reader.num_record_batches):
        column = reader.get_batch(i).column(0)
        if column.null_count:
            raise ShardError(f"{path}: record batch {i} has nulls")
        # (tokens,) read-only view into the mmap; frombuffer skips to_numpy's lazy pandas import.
        data = column.buffers()[1]
        arrays.append(np.frombuffer(data, dtype=np.uint16, count=len(column), offset=column.offset * 2))
    if len(arrays) != len(meta.get("segments", ())):
        raise ShardError(f"{path}: {len(arrays)} record batches but {len(meta.get('segments', ()))} in metadata")
    return OpenShard(path, meta, tuple(arrays))


def verify_dataset(data_dir: str | os.PathLike, expected_tokenizer: str | None = None) -> DatasetManifest:
    """Check every shard against the manifest: size, sha256, tokenizer, and counts recounted from the ids.

    Reads every byte, so it is for tests, CI and after copies, not for each training start.

    Raises:
        ShardError: the first inconsistency, naming the file.
    """
    manifest = read_manifest(data_dir)
    if expected_tokenizer is not None and manifest.tokenizer != expected_tokenizer:
        raise TokenizerMismatchError(
            f"{manifest.path}: dataset tokenizer {manifest.tokenizer!r}, expected {expected_tokenizer!r}"
        )
    for info in manifest.shards:
        path = manifest.root / info.path
        if not path.is_file() or path.stat().st_size != info.bytes:
            raise ShardError(f"{path}: missing or not {info.bytes} bytes as the manifest says")
        if file_sha256(path) != info.sha256:
            raise ShardError(f"{path}: sha256 differs from the manifest")
        shard = open_shard(path, manifest.tokenizer)
        recounted = tuple(
            Segment(seg["source"], int(np.count_nonzero(arr == EOD_ID)), int(arr.size))
            for seg, arr in zip(shard.meta["segments"], shard.arrays)
        )
        if recounted != info.segments:
            raise ShardError(f"{path}: contents {recounted} differ from the manifest's {info.segments}")
    return manifest
