"""Long samples for the long-context stage, packed from a run's own training shards.

A long sample is `sample_len` input ids stored with the id that follows them (`sample_len + 1` ids, as a
pretraining window is stored), so the model sees exactly `sample_len` positions. Samples come from the longest
documents first, so that as much of each sample as possible is one document whose far context matters:

- sources in the order `sources` gives (default `LONG_SOURCES`: books, arXiv, GitHub, then the other sources
  by name), each drained before the next, because books, papers and code are where long documents are;
- within a source, its documents from the longest to the shortest (ties in shard order);
- documents concatenated within a source as the shards hold them, each ending with the end-of-document id 0,
  so consecutive documents are separated by one 0; a sample never mixes sources, and a source's last partial
  sample is dropped.

The held-out samples (evaluation) and the training samples share no document: going down the length ranking,
every other document goes to the held-out set until it is full, the rest to training. Held-out documents are
as long as training ones and are never trained on in this stage (pretraining saw both).

Documents are found by their end-of-document ids in the memory-mapped shards. On a large dataset `scan_tokens`
bounds how much of each source is read; the longest documents are then those of the scanned part.

`out_dir` holds `train.npy` and `heldout.npy` (`(n, sample_len + 1)` uint16) and `long_samples.json`, written
last: a folder with that file for the same spec and dataset is complete, and packing it again does nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_path, atomic_write_text
from data_prep.errors import PackingError
from data_prep.shards import EOD_ID, DatasetManifest, open_shard, read_manifest

__all__ = ["LONG_SOURCES", "SAMPLES_META", "LongSamples", "pack_long_samples", "read_long_samples"]

LONG_SOURCES = ("RedPajamaBook", "RedPajamaArXiv", "RedPajamaGithub")
"""The sources drained first: the ones whose documents run longest (SlimPajama's `redpajama_set_name`)."""
SAMPLES_META = "long_samples.json"
_FORMAT = "rwkv5-long-samples/1"


@dataclass(frozen=True)
class _Doc:
    """One document of a shard segment: `length` ids (its end-of-document id included) from `start`."""

    shard: int
    batch: int
    start: int
    length: int


@dataclass(frozen=True)
class LongSamples:
    """A packed folder: where its arrays are and what is in them.

    Args:
        root: the folder.
        meta: the parsed `long_samples.json` (spec, counts, the source of each sample).
    """

    root: Path
    meta: dict

    @property
    def train(self) -> Path:
        return self.root / "train.npy"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.npy"


def _source_order(manifest: DatasetManifest, sources: Sequence[str] | None) -> list[str]:
    present = set(manifest.by_source)
    if sources is None:
        first = [s for s in LONG_SOURCES if s in present]
        return first + sorted(present - set(first))
    unknown = [s for s in sources if s not in present]
    if unknown:
        raise PackingError(f"{manifest.path}: sources {unknown} not in the dataset (it has {sorted(present)})")
    return list(sources)


def _documents(manifest: DatasetManifest, source: str, scan_tokens: int | None) -> list[_Doc]:
    """The source's documents, longest first (ties in shard order), from its first `scan_tokens` ids."""
    docs: list[_Doc] = []
    scanned = 0
    for shard_idx, info in enumerate(manifest.shards):
        batches = [i for i, seg in enumerate(info.segments) if seg.source == source and seg.tokens]
        if not batches or (scan_tokens is not None and scanned >= scan_tokens):
            continue
        arrays = open_shard(manifest.root / info.path, manifest.tokenizer).arrays
        for batch_idx in batches:
            ends = np.flatnonzero(arrays[batch_idx] == EOD_ID)  # each document ends with the id 0
            starts = np.concatenate([[0], ends[:-1] + 1])
            docs += [_Doc(shard_idx, batch_idx, int(a), int(b - a + 1)) for a, b in zip(starts, ends)]
            scanned += int(arrays[batch_idx].size)
    return sorted(docs, key=lambda d: -d.length)  # stable: equal lengths keep shard order


class _Packer:
    """Concatenates one source's documents and cuts them into samples of `width` ids, up to `limit` samples."""

    def __init__(self, width: int, limit: int):
        self.width, self.limit = width, limit
        self.samples: list[np.ndarray] = []
        self.sources: list[str] = []
        self._pending: list[np.ndarray] = []
        self._pending_ids = 0

    @property
    def full(self) -> bool:
        return len(self.samples) >= self.limit

    def add(self, ids: np.ndarray, source: str) -> None:
        self._pending.append(ids)
        self._pending_ids += ids.size
        while self._pending_ids >= self.width and not self.full:
            joined = np.concatenate(self._pending)
            self.samples.append(joined[: self.width].copy())
            self.sources.append(source)
            self._pending, self._pending_ids = [joined[self.width:]], joined.size - self.width

    def end_source(self) -> None:
        """A sample never mixes sources: what is left of this source is dropped."""
        self._pending, self._pending_ids = [], 0


def _spec(manifest: DatasetManifest, sample_len: int, train: int, heldout: int, order: list[str],
          scan_tokens: int | None) -> dict:
    return {"format": _FORMAT, "dataset": manifest.digest, "sample_len": sample_len, "train": train,
            "heldout": heldout, "sources": order, "scan_tokens": scan_tokens}


def _save(path: Path, rows: list[np.ndarray], width: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.stack(rows) if rows else np.empty((0, width), dtype=np.uint16))


def pack_long_samples(data_dir: str | os.PathLike, out_dir: str | os.PathLike, sample_len: int, train: int,
                      heldout: int, sources: Sequence[str] | None = None,
                      scan_tokens: int | None = None) -> LongSamples:
    """Pack `train` training and `heldout` held-out samples of `sample_len` positions from `data_dir`'s shards.

    Args:
        data_dir: the tokenized training split (its `manifest.json`).
        out_dir: where the samples go (see the module docstring).
        sample_len: positions per sample; each sample holds `sample_len + 1` ids.
        train: training samples (the stage's steps x samples per step).
        heldout: held-out samples (the per-position evaluation's).
        sources: source names in the order they are drained. Default: `LONG_SOURCES`, then the rest by name.
        scan_tokens: ids read per source at most. Default: all.

    Returns:
        LongSamples: the folder and its metadata.

    Raises:
        PackingError: a bad size, an unknown source, or too few tokens for the samples asked for.
    """
    if sample_len < 1 or train < 1 or heldout < 1:
        raise PackingError(f"{out_dir}: sample_len ({sample_len}), train ({train}) and heldout ({heldout}) "
                           "samples must be >= 1")
    manifest = read_manifest(data_dir)
    order = _source_order(manifest, sources)
    spec = _spec(manifest, sample_len, train, heldout, order, scan_tokens)
    out = Path(out_dir)
    meta_path = out / SAMPLES_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == spec:
            return LongSamples(out, meta)
    width = sample_len + 1
    held, trained = _Packer(width, heldout), _Packer(width, train)
    documents = {"train": 0, "heldout": 0}
    for source in order:
        if held.full and trained.full:
            break
        for rank, ids in _read(manifest, source, scan_tokens):
            # Every other document down the ranking, while the held-out set needs more.
            packer, part = (held, "heldout") if rank % 2 and not held.full else (trained, "train")
            if packer.full:
                if held.full and trained.full:
                    break
                continue
            packer.add(ids, source)
            documents[part] += 1
        held.end_source()
        trained.end_source()
    if not (held.full and trained.full):
        raise PackingError(
            f"{manifest.path}: sources {order} give {len(trained.samples)} of {train} training and "
            f"{len(held.samples)} of {heldout} held-out samples of {sample_len} positions (scan_tokens "
            f"{scan_tokens}); ask for fewer or shorter samples")
    _save(out / "train.npy", trained.samples, width)
    _save(out / "heldout.npy", held.samples, width)
    meta = {"spec": spec, "documents": documents, "train_sources": trained.sources,
            "heldout_sources": held.sources}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return LongSamples(out, meta)


def _read(manifest: DatasetManifest, source: str, scan_tokens: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(rank by length, ids) of each document of a source, longest first."""
    arrays: dict[int, tuple[np.ndarray, ...]] = {}
    for rank, doc in enumerate(_documents(manifest, source, scan_tokens)):
        if doc.shard not in arrays:
            info = manifest.shards[doc.shard]
            arrays[doc.shard] = open_shard(manifest.root / info.path, manifest.tokenizer).arrays
        yield rank, arrays[doc.shard][doc.batch][doc.start: doc.start + doc.length]


def read_long_samples(path: str | os.PathLike) -> np.ndarray:
    """A packed `train.npy` or `heldout.npy` as a read-only memory-mapped `(n, sample_len + 1)` uint16 array."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise PackingError(f"{path}: not a packed long-sample file: {exc}") from None
