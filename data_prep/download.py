"""Download a selection of SlimPajama files into a folder: concurrent, resumable, and every file verified.

    summary = download(HubSource(), "data/raw", Selection(splits=("validation",), chunks=(1,)))

Guarantees:
- A file reaches its final path only after its sha256 matched the source's LFS metadata (or its git blob id,
  for files the Hub keeps in git; a folder source without a manifest is checked by size and its sha256
  recorded). Bytes that fail verification are deleted and fetched again, never kept; a local copy that
  fails leaves the manifest and its path before the refetch starts, so a failed refetch leaves no stale entry.
- A re-run skips what the manifest says is verified (same sha256, same size on disk), adopts complete files the
  manifest missed (a run killed between the last rename and the next manifest write) after hashing them, and
  resumes partial files with a Range request.
- 429 (honouring `Retry-After`), 5xx, timeouts and bodies cut short are retried with exponential backoff and
  jitter; files still failing are reported together after all others are done, and the manifest is written.
- A listed name that cannot be a local file (a control character such as NUL, a component longer than the file
  system allows) fails that file before any byte is fetched, with a one-line reason; the others still complete.
- `manifest.json` (format `MANIFEST_FORMAT`) lists what is local: path, size, sha256, what it was checked
  against. Written atomically, every few seconds and at the end. It never holds a credential.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from data_prep.errors import DownloadError, SourceError
from data_prep.source import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    FetchFailed,
    RemoteFile,
    Selection,
    Source,
    redact_url,
)

__all__ = ["DownloadSummary", "Manifest", "RetryPolicy", "download", "file_digests"]

logger = logging.getLogger(__name__)

_PARTIAL_DIR = ".incomplete"
_PART_SUFFIX = ".part"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try each file.

    Args:
        attempts: tries per file, the first included. Default: 6.
        base_delay: seconds before the first retry; doubles each retry (with jitter). Default: 1.0.
        max_delay: cap of the exponential delay. Default: 60.0.
        max_retry_after: cap of a server's `Retry-After`, so a bogus value cannot stall a run. Default: 300.0.
        connect_timeout: seconds to open a connection. Default: 10.0.
        read_timeout: seconds without a byte before an attempt is abandoned. Default: 60.0.
    """

    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry.attempts must be at least 1, got {self.attempts}")
        if min(self.base_delay, self.max_delay, self.max_retry_after) < 0:
            raise ValueError("retry delays must not be negative")
        if min(self.connect_timeout, self.read_timeout) <= 0:
            raise ValueError("retry timeouts must be positive")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1)) * rng.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff


@dataclass
class DownloadSummary:
    """What a download run did; `to_dict()` feeds a stage artifact.

    `verified` counts files whose bytes were hashed and matched in this run (downloaded or adopted);
    `skipped` ones were already verified by an earlier run; `bytes_received` counts bytes off the wire,
    retries included.
    """

    source: dict
    out_dir: str
    manifest: str
    selected: int = 0
    bytes_selected: int = 0
    downloaded: int = 0
    adopted: int = 0
    skipped: int = 0
    verified: int = 0
    failed: int = 0
    retries: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        """A short table for a Prefect markdown artifact."""
        rate = self.bytes_received / self.seconds / 2**20 if self.seconds > 0 else 0.0
        rows = [("selected", f"{self.selected} files, {self.bytes_selected / 2**30:.3f} GiB"),
                ("downloaded", str(self.downloaded)), ("already verified (skipped)", str(self.skipped)),
                ("adopted after hashing", str(self.adopted)), ("failed", str(self.failed)),
                ("retries", str(self.retries)), ("received", f"{self.bytes_received / 2**20:.1f} MiB"),
                ("time", f"{self.seconds:.1f} s ({rate:.1f} MiB/s)")]
        text = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
        if self.failures:
            text += "\nFailed files:\n" + "".join(f"- `{_shown(p)}`: {why}\n"
                                                 for p, why in sorted(self.failures.items()))
        return text


def file_digests(path: Path, size: int | None = None, git_oid: bool = False) -> tuple[str, str | None]:
    """(sha256, git blob id if asked) of a local file, in one read.

    The git blob id is sha1 over `blob {size}\\0` + content: the only checksum the Hub lists for non-LFS files.
    """
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % (size if size is not None else path.stat().st_size)) if git_oid else None
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            if git is not None:
                git.update(chunk)
    return sha.hexdigest(), git.hexdigest() if git is not None else None


def _unsafe_name(path: str, name_max: int) -> str | None:
    """Why `path` cannot be a local file name (a control character, a component too long), or None.

    Checked against the limit of the destination's file system, the `.part` suffix of the partial file
    included, so such a file fails with this reason before any byte is fetched instead of crashing `open`."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "its name holds a control character (NUL, newline, ...), which no local file name may hold"
    for part in path.split("/"):
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            return "its name is not valid UTF-8"
        if size + len(_PART_SUFFIX) > name_max:
            return (f"its name has a {size}-byte component; the local file system allows "
                    f"{name_max - len(_PART_SUFFIX)} (its limit of {name_max} less {_PART_SUFFIX!r})")
    return None


def _shown(path: str, limit: int = 120) -> str:
    """`path` fit for a one-line message: control characters escaped, a very long name shortened."""
    text = path if path.isprintable() else ascii(path)[1:-1]
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def _source_identity(described: dict) -> tuple:
    if described.get("kind") == "hub":
        return ("hub", described.get("repo_type"), described.get("repo_id"))
    return (described.get("kind"), described.get("url"))


class Manifest:
    """The record of verified local files of one folder (`{out_dir}/manifest.json`).

    Args:
        path: the JSON file.
        source: `Source.describe()` of the current run. A folder filled from another source is refused,
            so two datasets never mix under one manifest.
    """

    def __init__(self, path: Path, source: dict) -> None:
        self.path = path
        self.source = source
        self.files: dict[str, dict] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise SourceError(f"{path}: unreadable download manifest ({exc}); move it away to start over") \
                    from None
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise SourceError(f"{path}: not a download manifest (format {MANIFEST_FORMAT!r} expected)")
            if _source_identity(data.get("source", {})) != _source_identity(source):
                raise SourceError(f"{path.parent}: holds files of {redact_url(data.get('source'))}, not of {source}; "
                                  "download into another folder")
            root = path.parent
            # Entries whose file was deleted since are not local any more.
            self.files = {p: e for p, e in data.get("files", {}).items() if (root / p).is_file()}

    def is_verified(self, file: RemoteFile, local: Path) -> bool:
        """Whether an earlier run verified these exact bytes and the file on disk still has their size."""
        entry = self.files.get(file.path)
        if entry is None or entry.get("size") != file.size:
            return False
        if file.sha256 is not None and entry.get("sha256") != file.sha256:
            return False
        if file.sha256 is None and file.git_oid is not None and entry.get("git_oid") != file.git_oid:
            return False
        try:
            return local.stat().st_size == file.size
        except FileNotFoundError:
            return False

    def record(self, file: RemoteFile, sha256: str, checked: str) -> None:
        entry = {"size": file.size, "sha256": sha256, "checked": checked}
        if file.git_oid is not None:
            entry["git_oid"] = file.git_oid
        self.files[file.path] = entry

    def write(self) -> None:
        """Atomic: a reader (or a killed run) sees the old manifest or the new one, never half of one."""
        data = {"format": MANIFEST_FORMAT, "version": 1, "source": self.source,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": dict(sorted(self.files.items()))}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class _Aborted(Exception):
    """Another file hit a fatal error (or the run was interrupted): stop this one quietly."""


class _Run:
    """State shared by the worker threads of one `download` call."""

    def __init__(self, source: Source, out: Path, manifest: Manifest, summary: DownloadSummary,
                 retry: RetryPolicy, verify_existing: bool, manifest_interval: float, bar) -> None:
        self.source = source
        self.out = out
        self.manifest = manifest
        self.summary = summary
        self.retry = retry
        self.verify_existing = verify_existing
        self.manifest_interval = manifest_interval
        self.bar = bar
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.rng = random.Random()
        self.last_write = time.monotonic()
        self.dirty = False
        self.done = 0

    def on_bytes(self, n: int, received: bool = True) -> None:
        """Progress from a fetch (`n` < 0 when bytes are discarded). Stops the fetch once the run aborts."""
        if self.abort.is_set():
            raise _Aborted
        with self.lock:
            if received and n > 0:
                self.summary.bytes_received += n
            self.bar.update(n)

    def finish(self, file: RemoteFile, outcome: str, sha256: str | None = None, checked: str | None = None,
               failure: str | None = None) -> None:
        with self.lock:
            self.done += 1
            if outcome == "failed":
                self.summary.failed += 1
                self.summary.failures[file.path] = failure or "unknown error"
            else:
                setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)
                self.summary.verified += 1
                self.manifest.record(file, sha256, checked)
                self.dirty = True
                if time.monotonic() - self.last_write >= self.manifest_interval:
                    self._write_manifest()
            self.bar.set_postfix_str(f"files {self.done}/{self.bar.files_total}, failed {self.summary.failed}",
                                     refresh=False)

    def _write_manifest(self) -> None:
        self.manifest.write()
        self.last_write = time.monotonic()
        self.dirty = False

    def flush(self) -> None:
        with self.lock:
            if self.dirty:
                self._write_manifest()

    def sync(self, file: RemoteFile) -> None:
        """Make `file` local and verified, or record why not. Raises only fatal errors (`SourceError`)."""
        dest = self.out / file.path
        if dest.is_file() and dest.stat().st_size == file.size:
            sha256, problem, checked = self._verify(file, dest)
            if problem is None:
                self.on_bytes(file.size, received=False)
                self.finish(file, "adopted", sha256, checked)
                return
            self._forget(file, dest)
            logger.info("%s: local copy does not match the source (%s); deleted, fetching it again", file.path,
                        problem)
        try:
            sha256, checked = self._fetch_verified(file, dest)
        except FetchFailed as exc:
            logger.error("%s", exc)
            self.finish(file, "failed", failure=str(exc))
            return
        self.finish(file, "downloaded", sha256, checked)

    def _forget(self, file: RemoteFile, dest: Path) -> None:
        """Take a file that failed verification out of the manifest and off its final path, before anything
        else: if the refetch fails too, a re-run must not find it "already verified" (and tokenize must never
        read it)."""
        with self.lock:
            if self.manifest.files.pop(file.path, None) is not None:
                self._write_manifest()
        dest.unlink(missing_ok=True)

    def _verify(self, file: RemoteFile, path: Path) -> tuple[str, str | None, str]:
        """(sha256, problem or None, what it was checked against) of a complete local file."""
        want_git = file.sha256 is None and file.git_oid is not None
        sha256, git_oid = file_digests(path, file.size, git_oid=want_git)
        if file.sha256 is not None:
            problem = None if sha256 == file.sha256 else f"sha256 {sha256} differs from the source's {file.sha256}"
            return sha256, problem, "sha256"
        if want_git:
            problem = None if git_oid == file.git_oid else f"git blob id {git_oid} differs from {file.git_oid}"
            return sha256, problem, "git_oid"
        return sha256, None, "size"

    def _fetch_verified(self, file: RemoteFile, dest: Path) -> tuple[str, str]:
        part = self.out / _PARTIAL_DIR / f"{file.path}{_PART_SUFFIX}"
        part.parent.mkdir(parents=True, exist_ok=True)
        timeout = (self.retry.connect_timeout, self.retry.read_timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                offset = part.stat().st_size if part.exists() else 0
                if offset > file.size:
                    part.unlink()
                    offset = 0
                with open(part, "r+b" if offset else "wb") as f:
                    f.seek(offset)
                    if offset < file.size:
                        self.source.fetch(file, f, offset, self.on_bytes, timeout)
                size = part.stat().st_size
                if size != file.size:
                    if size > file.size:
                        part.unlink()
                    raise FetchFailed(f"{file.path}: received {size} of {file.size} bytes", retryable=True)
                sha256, problem, checked = self._verify(file, part)
                if problem is not None:
                    part.unlink()
                    self.on_bytes(-size)
                    raise FetchFailed(f"{file.path}: {problem}; deleted", retryable=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, dest)
                return sha256, checked
            except FetchFailed as exc:
                if not exc.retryable or attempt >= self.retry.attempts:
                    raise FetchFailed(f"{exc} (gave up after {attempt} attempt{'s' * (attempt > 1)})",
                                      retryable=False) from None
                delay = self.retry.delay(attempt, exc.retry_after, self.rng)
                with self.lock:
                    self.summary.retries += 1
                logger.warning("%s; retry %d/%d in %.2fs", exc, attempt, self.retry.attempts - 1, delay)
                if self.abort.wait(delay):
                    raise _Aborted from None


def _retrying(call, retry: RetryPolicy, what: str):
    """`call()`, retried on `FetchFailed` like a file; a listing that keeps failing is a `SourceError`."""
    rng = random.Random()
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except FetchFailed as exc:
            if attempt == retry.attempts:
                raise SourceError(f"{exc} (gave up after {attempt} attempts)") from None
            delay = retry.delay(attempt, exc.retry_after, rng)
            logger.warning("%s failed: %s; retry %d/%d in %.2fs", what, exc, attempt, retry.attempts - 1, delay)
            time.sleep(delay)


def _progress_bar(total_bytes: int, files: int, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="download",
               disable=not enabled, mininterval=0.5, dynamic_ncols=True)
    bar.files_total = files
    return bar


def download(
    source: Source,
    out_dir: str | Path,
    selection: Selection | None = None,
    *,
    workers: int = 8,
    retry: RetryPolicy | None = None,
    verify_existing: bool = False,
    progress: bool = True,
    strict: bool = True,
    manifest_interval: float = 5.0,
) -> DownloadSummary:
    """Fetch the selected files of `source` into `out_dir` (same relative paths) and verify each one.

    Args:
        source: a `HubSource` or `LocalSource` (see `data_prep.source.open_source`).
        out_dir: destination folder; holds `manifest.json` and, while running, `.incomplete/` partial files.
        selection: which files. Default: every `.jsonl.zst` of the source.
        workers: files fetched at once. Small files (validation/test, 12-47 kB) are bound by request latency,
            large ones by bandwidth; 8-16 suits both. Default: 8.
        retry: attempts, backoff and timeouts. Default: `RetryPolicy()`.
        verify_existing: re-hash files the manifest already lists instead of trusting size + manifest.
        progress: show a tqdm bar (bytes, rate, ETA, files done).
        strict: raise `DownloadError` (carrying the summary) when any file failed.
        manifest_interval: seconds between manifest writes while running (it is always written at the end).

    Returns:
        The run's `DownloadSummary`.

    Raises:
        SourceError: the source cannot be listed or refuses access (no retry helps); nothing half-written.
        DownloadError: some files failed after all retries (only with `strict`), after the others finished.
    """
    started = time.monotonic()
    selection = selection or Selection()
    retry = retry or RetryPolicy()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _retrying(source.resolve, retry, f"resolving {source!r}")
    manifest = Manifest(out / MANIFEST_NAME, source.describe())
    logger.info("listing %r with %s", source, selection)
    files = _retrying(lambda: source.list(selection), retry, f"listing {source!r}")
    summary = DownloadSummary(source=source.describe(), out_dir=str(out), manifest=str(manifest.path),
                              selected=len(files), bytes_selected=sum(f.size for f in files))
    todo = []
    try:
        name_max = os.pathconf(out, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for file in files:
        problem = _unsafe_name(file.path, name_max)
        if problem is not None:  # counted as failed now; every other file is still fetched
            logger.error("%s: %s; not downloaded", _shown(file.path), problem)
            summary.failed += 1
            summary.failures[file.path] = problem
        elif not verify_existing and manifest.is_verified(file, out / file.path):
            summary.skipped += 1
        else:
            todo.append(file)
    logger.info("%d files selected: %d already verified, %d to check or fetch", len(files), summary.skipped,
                len(todo))
    bar = _progress_bar(sum(f.size for f in todo), len(todo), progress)
    run = _Run(source, out, manifest, summary, retry, verify_existing, manifest_interval, bar)
    fatal: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        pending = {pool.submit(run.sync, f) for f in todo}
        while pending and fatal is None:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in finished if f.exception() is not None]
            fatal = next((e for e in errors if not isinstance(e, _Aborted)), None)
        if fatal is not None:
            run.abort.set()
    except BaseException:
        # Interrupted: running workers stop at their next chunk instead of finishing their file.
        run.abort.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        run.flush()
        if not manifest.path.exists():
            manifest.write()
        summary.seconds = time.monotonic() - started
    if fatal is not None:
        raise fatal
    logger.info("download done: %d downloaded, %d adopted, %d skipped, %d failed, %.1f MiB in %.1f s",
                summary.downloaded, summary.adopted, summary.skipped, summary.failed,
                summary.bytes_received / 2**20, summary.seconds)
    if strict and summary.failures:
        listed = "; ".join(f"{_shown(p)}: {why}" for p, why in sorted(summary.failures.items())[:10])
        more = f" (and {summary.failed - 10} more)" if summary.failed > 10 else ""
        raise DownloadError(f"{summary.failed} of {summary.selected} files failed verification or download "
                            f"into {out}: {listed}{more}. Re-run to retry only these.", summary)
    return summary
