"""Token datasets on object storage (`s3://`, `gs://`, any pyarrow or fsspec filesystem), read through a bounded
node-local cache.

The loader memory-maps shards, which needs local files. `RemoteDataset` copies `manifest.json` from the store
when it is opened and each shard the first time it is needed, into a cache folder of at most `max_bytes`
(least recently used shards go first). A fill downloads to a temporary name in the cache folder, checks the
size and sha256 the manifest lists, and only then renames the file into place, so a reader never sees a
partial or corrupt shard under its final name, and several processes of one node (the 8 ranks of a GPU
node) can share one cache: recency is the file's mtime, updated on every use, and eviction scans the folder.
Memory-mapped shards stay readable after eviction (the kernel keeps an unlinked file until its last map
closes), so the cache may briefly exceed its budget by the shards the loader holds open.

The sample order does not depend on where the shards are: the manifest (and so its digest) is the same
file, so a run resumed from the store reads exactly the samples it would have read from a local copy.

    RemoteDataset("s3://bucket/slimpajama/tokens/train", cache_dir="/scratch/shards", max_bytes=2 << 40)

S3 credentials and endpoint come from the usual AWS variables (`AWS_ENDPOINT_URL` for S3-compatible stores).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from data_prep.atomic import TEMP_MARK, atomic_write_bytes
from data_prep.errors import ShardError, SourceError
from data_prep.shards import MANIFEST_NAME, OpenShard, ShardInfo, file_sha256, open_shard, read_manifest
from data_prep.source import redact_url

__all__ = [
    "CACHE_BYTES_ENV",
    "CACHE_DIR_ENV",
    "RemoteDataset",
    "ShardCache",
    "filesystem",
    "is_remote",
    "upload_dataset",
]

CACHE_DIR_ENV = "RWKV5_SHARD_CACHE"
CACHE_BYTES_ENV = "RWKV5_SHARD_CACHE_BYTES"
_DEFAULT_CACHE_BYTES = 64 << 30  # 64 GiB: ~1000 shards of 64 MiB, a few hours of a GPU node's reading
_CHUNK = 8 << 20
_PART = ".part-"


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, hdfs://, memory://, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it for `uri`: pyarrow's own (s3, gs, hdfs, file) when it knows
    the scheme, else the fsspec implementation wrapped for pyarrow (so Ray Train can use it too).

    Raises:
        SourceError: neither pyarrow nor fsspec knows the scheme.
    """
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError):  # pyarrow's ArrowInvalid / ArrowNotImplementedError
        pass
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{redact_url(uri)}: no pyarrow or fsspec filesystem for this scheme "
                          f"({redact_url(exc)})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class ShardCache:
    """A folder of fetched files bounded by total bytes, least recently used evicted first.

    Args:
        root: the cache folder (created on demand); may be shared by the processes of one node.
        max_bytes: total size the cache keeps itself under after each fill. The file just fetched is never
            evicted, so one file larger than the budget is still served.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"shard cache budget must be >= 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes

    def fetch(self, fs: pafs.FileSystem, src: str, rel: str, size: int, sha256: str) -> Path:
        """Local path of `rel`, downloading `src` from `fs` if it is not cached; checks size and sha256.

        Raises:
            ShardError: the remote file is missing, unreadable, or differs from its manifest entry.
        """
        local = self.root / rel
        try:
            if local.stat().st_size == size:
                os.utime(local)  # mark as recently used
                return local
        except FileNotFoundError:
            pass
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}{_PART}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(src) as remote, open(tmp, "wb") as out:
                while block := remote.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
            got = tmp.stat().st_size
            if got != size or digest.hexdigest() != sha256:
                raise ShardError(
                    f"{src}: fetched {got} bytes with sha256 {digest.hexdigest()[:12]}..., the manifest lists "
                    f"{size} bytes with sha256 {sha256[:12]}..."
                )
            os.replace(tmp, local)
        except FileNotFoundError:
            raise ShardError(f"{src}: shard listed in the manifest is missing from the store") from None
        except OSError as exc:
            raise ShardError(f"{src}: could not fetch the shard: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=local)
        return local

    def files(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every complete cached file, oldest first."""
        found = []
        for path in self.root.rglob("*"):
            if _PART in path.name or TEMP_MARK in path.name or path.name == MANIFEST_NAME:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if path.is_file():
                found.append((st.st_mtime, st.st_size, path))
        return sorted(found)

    def size(self) -> int:
        return sum(size for _, size, _ in self.files())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used files until the total fits the budget; returns what was deleted."""
        files = self.files()
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
        return removed


class RemoteDataset:
    """A token dataset on a remote filesystem, seen through a local `ShardCache`.

    Args:
        uri: the dataset folder (holding `manifest.json`), e.g. `s3://bucket/tokens/train`.
        cache_dir: local cache root; this dataset uses a sub-folder named after the URI. Default:
            $RWKV5_SHARD_CACHE, else `~/.cache/rwkv5/shards`.
        max_bytes: cache budget for this dataset's shards. Default: $RWKV5_SHARD_CACHE_BYTES, else 64 GiB.

    Raises:
        ShardError: the store has no readable manifest at `uri`.
    """

    def __init__(self, uri: str, cache_dir: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri)
        base = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "rwkv5" / "shards")
        budget = max_bytes if max_bytes is not None else int(os.environ.get(CACHE_BYTES_ENV, _DEFAULT_CACHE_BYTES))
        self.local_root = base / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.cache = ShardCache(self.local_root, budget)
        self._fetch_manifest()

    def _fetch_manifest(self) -> None:
        """Copy the manifest every time a dataset is opened: it is small and decides what the shards are."""
        src = f"{self.path}/{MANIFEST_NAME}"
        try:
            with self.fs.open_input_stream(src) as remote:
                data = remote.read()
        except FileNotFoundError:
            raise ShardError(f"{redact_url(self.uri)}/{MANIFEST_NAME}: no dataset manifest in the store") from None
        except OSError as exc:
            raise ShardError(f"{redact_url(self.uri)}/{MANIFEST_NAME}: unreadable: {redact_url(exc)}") from None
        atomic_write_bytes(self.local_root / MANIFEST_NAME, data)

    def shard_path(self, info: ShardInfo) -> Path:
        """The local copy of one manifest entry, fetched (and verified) if it is not cached."""
        return self.cache.fetch(self.fs, f"{self.path}/{info.path}", info.path, info.bytes, info.sha256)

    def open_shard(self, info: ShardInfo, expected_tokenizer: str | None = None) -> OpenShard:
        """Fetch and memory-map a shard; fetches again if another process evicted it in between."""
        path = self.shard_path(info)
        try:
            return open_shard(path, expected_tokenizer)
        except ShardError:
            if path.exists():
                raise
        return open_shard(self.shard_path(info), expected_tokenizer)


def upload_dataset(local_dir: str | os.PathLike, uri: str, verify: bool = True) -> int:
    """Copy a local token dataset to `uri`: the shards first, the manifest last (readers trust the manifest).

    Shards already in the store with the listed size are skipped, so an interrupted upload resumes.

    Args:
        local_dir: dataset folder with `manifest.json`.
        uri: destination folder, e.g. `s3://bucket/tokens/train`.
        verify: re-hash each local shard before sending it. Default: True.

    Returns:
        Bytes uploaded.
    """
    manifest = read_manifest(local_dir)
    fs, base = filesystem(uri.rstrip("/"))
    sent = 0
    for info in manifest.shards:
        src, dst = manifest.root / info.path, f"{base}/{info.path}"
        if fs.get_file_info(dst).size == info.bytes:
            continue
        if verify and file_sha256(src) != info.sha256:
            raise ShardError(f"{src}: sha256 differs from {manifest.path}; not uploading a corrupt shard")
        fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        with open(src, "rb") as fh, fs.open_output_stream(dst) as out:
            while block := fh.read(_CHUNK):
                out.write(block)
        sent += info.bytes
    with fs.open_output_stream(f"{base}/{MANIFEST_NAME}") as out:
        out.write(manifest.path.read_bytes())
    return sent
