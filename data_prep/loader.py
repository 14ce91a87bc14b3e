"""Packed training windows over a token dataset, in an order that is a pure function of (seed, manifest, index).

Packing. Each source's segments (one per shard record batch, in manifest order) form that source's token
stream. Window w of a stream is `stream[w * ctx_len : w * ctx_len + ctx_len + 1]`: ctx_len + 1 tokens, so
consecutive windows overlap by one token and every token after a stream's first is a training target exactly
once (inputs `window[:-1]`, targets `window[1:]`). No padding: documents are separated by the id 0 only and a
window runs across document ends. The last partial window of each stream is dropped (< ctx_len tokens per
source). Windows may run across shard boundaries within a source; such a window (about one in
shard_tokens / ctx_len) is copied, every other one is a zero-copy view of the memory-mapped shard.

Order. Global position p lies in epoch e = p // len(ds). A full-period permutation of [0, len(ds)) — a
Feistel network over the next even power of two with cycle walking, keyed by (seed, manifest digest, epoch) —
maps p to a sample; each epoch uses a different key. Nothing but the position is state: a run that has
consumed s samples resumes at position s on any number of ranks, and ranks take disjoint slices of each
global batch (`rank_positions`).

Mixture. Optional per-source weights set how many of an epoch's len(ds) samples each source gets (largest
remainder rounding); a source drawn more often than it has windows repeats its windows in fresh permutations,
one drawn less often moves through its windows across epochs. Without weights each window appears exactly once
per epoch and `sample_id` returns a permutation of [0, len(ds)).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from data_prep.errors import ShardError, TokenizerMismatchError
from data_prep.remote import RemoteDataset, is_remote
from data_prep.shards import DatasetManifest, open_shard, read_manifest

__all__ = ["FeistelPermutation", "PackedDataset", "rank_positions", "validation_dataset"]

_FEISTEL_ROUNDS = 6
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap bijective avalanche on uint64 (wraps modulo 2**64 on purpose)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed bijection of [0, n), evaluated pointwise in O(1) without storing the permutation.

    A balanced Feistel network on 2h bits (2**(2h) >= n, so < 4n) is a bijection whatever its round
    function; cycle walking (re-applying it while the value is >= n) restricts it to [0, n), taking under
    four applications on average.

    Args:
        n: domain size, >= 1.
        key: any bytes; different keys give unrelated permutations.
    """

    def __init__(self, n: int, key: bytes) -> None:
        if n < 1:
            raise ValueError(f"permutation domain must be >= 1, got {n}")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half) - 1)
        digest = hashlib.blake2b(key, digest_size=8 * _FEISTEL_ROUNDS).digest()
        self._keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, x: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Map values in [0, n) to their images; returns int64 with the shape of `x`."""
        x = np.asarray(x, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"permutation input outside [0, {self.n})")
        y = self._round_trip(x.astype(np.uint64).reshape(-1))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._round_trip(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(x.shape)


def rank_positions(consumed: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Global positions of one rank's micro-batch when `consumed` samples were taken before this step.

    A global batch is `batch_size * world_size` consecutive positions; rank r takes the r-th block. The
    resume state is `consumed` alone, so a run may restart with another world size.

    Returns:
        `(batch_size,)` int64 positions.
    """
    if not 0 <= rank < world_size or batch_size < 1 or consumed < 0:
        raise ValueError(f"bad slice: consumed={consumed} batch_size={batch_size} rank={rank}/{world_size}")
    start = consumed + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


def _quotas(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split sum(counts) samples across sources in proportion to weights (largest remainder)."""
    total = int(counts.sum())
    exact = weights / weights.sum() * total
    quota = np.floor(exact).astype(np.int64)
    short = total - int(quota.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - quota)))  # largest remainder first, ties by index
    quota[order[:short]] += 1
    return quota


class PackedDataset:
    """ctx_len + 1 token windows of a dataset, addressed by global position.

    Args:
        data_dir: dataset directory with `manifest.json`, local or a URI (`s3://...`, any pyarrow/fsspec
            filesystem: shards are then fetched into a bounded local cache, see `data_prep.remote`).
        ctx_len: training context; a window has ctx_len + 1 tokens.
        seed: order seed. Default: 0.
        expected_tokenizer: the run's tokenizer fingerprint; the manifest and every shard must match it.
            Default: None (accept the manifest's).
        mixture: optional weight per source name (sources not named get weight 0). Default: None (each
            window once per epoch).
        shuffle: False reads windows in stream order (validation). Default: True.
        max_open_shards: shards kept memory-mapped at once (each holds a file descriptor). Default: 64.
        cache_dir, cache_bytes: the local shard cache of a remote `data_dir`. Default: $RWKV5_SHARD_CACHE
            and $RWKV5_SHARD_CACHE_BYTES, else ~/.cache/rwkv5/shards and 64 GiB.

    Raises:
        TokenizerMismatchError: the manifest or a shard was written by another tokenizer.
        ShardError: the manifest is unusable, or the data has no full window.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        ctx_len: int,
        seed: int = 0,
        expected_tokenizer: str | None = None,
        mixture: Mapping[str, float] | None = None,
        shuffle: bool = True,
        max_open_shards: int = 64,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        if ctx_len < 1:
            raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
        self._remote = RemoteDataset(str(data_dir), cache_dir, cache_bytes) if is_remote(data_dir) else None
        self.manifest: DatasetManifest = read_manifest(self._remote.local_root if self._remote else data_dir)
        if expected_tokenizer is not None and self.manifest.tokenizer != expected_tokenizer:
            raise TokenizerMismatchError(
                f"{self.manifest.path}: dataset tokenizer {self.manifest.tokenizer!r}, "
                f"expected {expected_tokenizer!r}"
            )
        self.ctx_len = ctx_len
        self.seed = seed
        self.shuffle = shuffle
        self.max_open_shards = max_open_shards
        self._build_streams()
        self._build_mixture(mixture)
        self._digest = self.manifest.digest
        self._perms: dict[tuple, FeistelPermutation] = {}
        self._open: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()

    def _build_streams(self) -> None:
        # Per source: segment list (shard index, batch index) and the stream offset where each segment starts.
        segs: dict[str, list[tuple[int, int, int]]] = {}
        for shard_idx, shard in enumerate(self.manifest.shards):
            for batch_idx, seg in enumerate(shard.segments):
                if seg.tokens:
                    segs.setdefault(seg.source, []).append((shard_idx, batch_idx, seg.tokens))
        self.sources: tuple[str, ...] = tuple(sorted(segs))
        self._seg_loc: list[np.ndarray] = []  # per source (S_s, 2): shard index, batch index
        self._seg_start: list[np.ndarray] = []  # per source (S_s + 1,): stream offsets, last = stream length
        windows = []
        for source in self.sources:
            table = np.asarray(segs[source], dtype=np.int64)
            self._seg_loc.append(table[:, :2])
            self._seg_start.append(np.concatenate([[0], np.cumsum(table[:, 2])]))
            windows.append(max(0, (int(self._seg_start[-1][-1]) - 1) // self.ctx_len))
        self.windows_per_source = dict(zip(self.sources, windows))
        self._win_start = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)  # sample id offsets
        if self._win_start[-1] == 0:
            raise ShardError(
                f"{self.manifest.path}: {self.manifest.tokens} tokens hold no window of {self.ctx_len + 1}"
            )

    def _build_mixture(self, mixture: Mapping[str, float] | None) -> None:
        counts = np.diff(self._win_start)
        if mixture is None:
            self._quota = counts
            self._weighted = False
        else:
            unknown = sorted(set(mixture) - set(self.sources))
            if unknown or any(w < 0 for w in mixture.values()):
                raise ShardError(
                    f"{self.manifest.path}: mixture {dict(mixture)} names unknown sources {unknown} or negative "
                    f"weights; sources here: {list(self.sources)}"
                )
            weights = np.array([float(mixture.get(s, 0.0)) for s in self.sources])
            weights[counts == 0] = 0.0
            if weights.sum() <= 0:
                raise ShardError(f"{self.manifest.path}: mixture {dict(mixture)} gives no source any weight")
            self._quota = _quotas(counts, weights)
            self._weighted = True
        self._quota_start = np.concatenate([[0], np.cumsum(self._quota)]).astype(np.int64)

    def __len__(self) -> int:
        """Samples per epoch: the number of windows (also with a mixture, which only redistributes them)."""
        return int(self._quota_start[-1])

    def __getstate__(self) -> dict:
        # Memory maps do not pickle; a worker process re-opens shards lazily.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _perm(self, *key: object) -> FeistelPermutation:
        perm = self._perms.get(key)
        if perm is None:
            # ("epoch", e) permutes an epoch's positions; ("source", s, c) permutes source s's windows in cycle c.
            n = len(self) if key[0] == "epoch" else int(self._win_start[key[1] + 1] - self._win_start[key[1]])
            material = f"{self.seed}|{self._digest}|{'|'.join(map(str, key))}".encode()
            perm = FeistelPermutation(n, material)
            if len(self._perms) > 256:
                self._perms.clear()
            self._perms[key] = perm
        return perm

    def sample_ids(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectorized `sample_id`: `(B,)` positions to `(B,)` int64 window ids in [0, total windows)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError(f"positions must be >= 0, got {positions.min()}")
        n = len(self)
        epoch, offset = np.divmod(positions, n)
        drawn = offset.copy()
        if self.shuffle:
            for e in np.unique(epoch):
                sel = epoch == e
                drawn[sel] = self._perm("epoch", int(e))(offset[sel])
        if not self._weighted:
            return drawn
        # drawn indexes the epoch's quota slots; slot j of source s is that source's (e * quota_s + j)-th draw.
        src = np.searchsorted(self._quota_start, drawn, side="right") - 1
        ids = np.empty_like(drawn)
        counts = np.diff(self._win_start)
        for s in np.unique(src):
            sel = src == s
            draw = epoch[sel] * self._quota[s] + (drawn[sel] - self._quota_start[s])
            cycle, within = np.divmod(draw, counts[s])
            local = within.copy()
            if self.shuffle:
                for c in np.unique(cycle):
                    csel = cycle == c
                    local[csel] = self._perm("source", int(s), int(c))(within[csel])
            ids[sel] = self._win_start[s] + local
        return ids

    def sample_id(self, position: int) -> int:
        """The window id read at global `position`; positions >= len continue into later epochs."""
        return int(self.sample_ids(np.array([position]))[0])

    def source_of(self, sample_id: int) -> str:
        """Source name of a window id."""
        return self.sources[int(np.searchsorted(self._win_start, sample_id, side="right") - 1)]

    def _segment_array(self, source: int, seg: int) -> np.ndarray:
        shard_idx, batch_idx = (int(v) for v in self._seg_loc[source][seg])
        arrays = self._open.get(shard_idx)
        if arrays is None:
            info = self.manifest.shards[shard_idx]
            if self._remote is not None:
                shard = self._remote.open_shard(info, self.manifest.tokenizer)
            else:
                shard = open_shard(self.manifest.root / info.path, self.manifest.tokenizer)
            sizes = tuple(int(a.size) for a in shard.arrays)
            if sizes != tuple(s.tokens for s in info.segments):
                raise ShardError(f"{shard.path}: batch sizes {sizes} differ from the manifest's entry")
            arrays = shard.arrays
            self._open[shard_idx] = arrays
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard_idx)
        return arrays[batch_idx]

    def window(self, sample_id: int) -> np.ndarray:
        """Window `sample_id` as `(ctx_len + 1,)` uint16; a view of the mmap unless it crosses a shard."""
        if not 0 <= sample_id < self._win_start[-1]:
            raise IndexError(f"window id {sample_id} outside [0, {self._win_start[-1]})")
        source = int(np.searchsorted(self._win_start, sample_id, side="right") - 1)
        begin = (sample_id - int(self._win_start[source])) * self.ctx_len
        end = begin + self.ctx_len + 1
        starts = self._seg_start[source]
        seg = int(np.searchsorted(starts, begin, side="right") - 1)
        if end <= starts[seg + 1]:
            return self._segment_array(source, seg)[begin - starts[seg] : end - starts[seg]]
        parts = []
        while begin < end:
            lo, hi = int(starts[seg]), int(starts[seg + 1])
            parts.append(self._segment_array(source, seg)[begin - lo : min(end, hi) - lo])
            begin = min(end, hi)
            seg += 1
        return np.concatenate(parts)

    def __getitem__(self, position: int) -> np.ndarray:
        """The `(ctx_len + 1,)` uint16 window at global `position` (zero-copy unless it crosses a shard)."""
        return self.window(self.sample_id(position))

    def batch(self, positions: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows at `positions`: `(B, ctx_len + 1)` uint16 tokens and their `(B,)` int64 window ids."""
        ids = self.sample_ids(positions)
        out = np.empty((ids.size, self.ctx_len + 1), dtype=np.uint16)
        for row, sid in enumerate(ids):
            out[row] = self.window(int(sid))
        return out, ids

    def iter_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, consumed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless batches for one rank starting after `consumed` global samples (the resume counter).

        Yields:
            `(batch_size, ctx_len + 1)` uint16 tokens and `(batch_size,)` int64 ids; the global counter
            advances by `batch_size * world_size` per step.
        """
        while True:
            yield self.batch(rank_positions(consumed, batch_size, rank, world_size))
            consumed += batch_size * world_size


def validation_dataset(
    data_dir: str | os.PathLike, ctx_len: int, expected_tokenizer: str | None = None
) -> PackedDataset:
    """The validation split's windows in stream order (no shuffle), each exactly once per pass.

    Evaluate with `ds.batch(range(i, min(i + B, len(ds))))` over `range(rank * B, len(ds), world_size * B)`;
    ids come back in order, so per-source losses follow from `ds.source_of`.
    """
    return PackedDataset(data_dir, ctx_len, expected_tokenizer=expected_tokenizer, shuffle=False)
