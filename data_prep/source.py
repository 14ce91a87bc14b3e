"""Where raw SlimPajama files come from: a Hub dataset repo at a pinned commit, or a directory with the same layout.

A source does two things: list the files of a `Selection` with their sizes and checksums, and fetch one file's
bytes into a local partial file (resuming from its current size). Retrying, verifying and bookkeeping are the
caller's job (`data_prep.download`), so both kinds of source get the same guarantees.

Layout (SlimPajama-627B): `train/chunk{1..10}/example_train_{i}.jsonl.zst`,
`validation|test/chunk{1..5}/example_holdout_{i}.jsonl.zst`.
"""

from __future__ import annotations

import email.utils
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from data_prep.errors import DataPrepError, SelectionError, SourceError

__all__ = [
    "DEFAULT_REPO_ID",
    "DEFAULT_REVISION",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "FetchFailed",
    "HubSource",
    "LocalSource",
    "RemoteFile",
    "Selection",
    "Source",
    "open_source",
    "redact_url",
]

DEFAULT_REPO_ID = "cerebras/SlimPajama-627B"
# The commit HF cache snapshots of SlimPajama-627B carry (`snapshots/2d0accdd...`); pinned so that a re-run, or
# another node, lists exactly the same files even if the repo's main branch moves.
DEFAULT_REVISION = "2d0accdd58c5d5511943ca1f5ff0e3eb5e293543"
# Identifies a download manifest (`data_prep.download`); a local source that carries one is verified against it.
MANIFEST_FORMAT = "rwkv5-pipeline/download-manifest"
MANIFEST_NAME = "manifest.json"

_LAYOUT = re.compile(r"^(?P<split>[^/]+)/chunk(?P<chunk>\d+)/")
_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source.

    Args:
        path: path relative to the source root, `/`-separated (`train/chunk1/example_train_0.jsonl.zst`).
        size: size in bytes.
        sha256: expected hex sha256 (the Hub's LFS oid), or None when the source publishes none.
        git_oid: git blob id, the only checksum the Hub publishes for files not stored through LFS.
    """

    path: str
    size: int
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class Selection:
    """Which files to take. Empty tuples mean "all".

    Args:
        splits: top-level folders (`train`, `validation`, `test`).
        chunks: chunk numbers (`chunk{n}` folders). Needs the SlimPajama layout.
        globs: fnmatch patterns over the relative path; a file must match one. Default: the data files.
        fraction: keep this fraction of the matching files, chosen by a hash of (seed, path): deterministic,
            stable when the listing grows, and a smaller fraction is a subset of a larger one. At least one
            file is kept when any matches. Default: 1.0 (all).
        seed: changes which files a fraction keeps.
    """

    splits: tuple[str, ...] = ()
    chunks: tuple[int, ...] = ()
    globs: tuple[str, ...] = ("*.jsonl.zst",)
    fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise SelectionError(f"selection.fraction must be in (0, 1], got {self.fraction}")
        for split in self.splits:
            if not split or "/" in split or split in (".", ".."):
                raise SelectionError(f"selection.splits: {split!r} is not a folder name")
        for chunk in self.chunks:
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise SelectionError(f"selection.chunks: {chunk!r} is not a chunk number (1, 2, ...)")
        if self.chunks and not self.splits:
            raise SelectionError("selection.chunks needs selection.splits (chunk numbers exist per split)")

    def prefixes(self) -> list[str]:
        """Folders to list: only those the selection can match, so listing `validation` skips 59k train files."""
        if not self.splits:
            return [""]
        if not self.chunks:
            return sorted(set(self.splits))
        return [f"{s}/chunk{c}" for s in sorted(set(self.splits)) for c in sorted(set(self.chunks))]

    def matches(self, path: str) -> bool:
        if self.splits or self.chunks:
            layout = _LAYOUT.match(path)
            if layout is None or layout["split"] not in self.splits:
                return False
            if self.chunks and int(layout["chunk"]) not in self.chunks:
                return False
        return not self.globs or any(fnmatch.fnmatchcase(path, g) for g in self.globs)

    def apply(self, files: list[RemoteFile]) -> list[RemoteFile]:
        """The selected files, sorted by path."""
        chosen = sorted((f for f in files if self.matches(f.path)), key=lambda f: f.path)
        if self.fraction >= 1.0 or not chosen:
            return chosen
        keyed = [(self._key(f.path), f) for f in chosen]
        kept = [f for key, f in keyed if key < self.fraction]
        return kept or [min(keyed, key=lambda kf: kf[0])[1]]

    def _key(self, path: str) -> float:
        digest = hashlib.sha256(f"{self.seed}:{path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64


class FetchFailed(DataPrepError):
    """One attempt to fetch a file failed. Internal to sources and `download`, which retries or reports it.

    Args:
        message: what failed (status, timeout, short body), naming the file.
        retryable: whether another attempt may succeed.
        retry_after: seconds the server asked us to wait (`Retry-After`), if any.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Source(Protocol):
    """What `download` needs from a source."""

    def resolve(self) -> str | None:
        """Pin the revision (a commit sha for the Hub, None for a directory) before listing.

        Raises `SourceError`, or `FetchFailed` when retrying may help (both also for `list`)."""

    def list(self, selection: Selection) -> list[RemoteFile]:
        """The selected files with sizes and expected checksums."""

    def fetch(self, file: RemoteFile, out: BinaryIO, offset: int, on_bytes: Callable[[int], None],
              timeout: tuple[float, float]) -> None:
        """Append the file's bytes from `offset` to `out`; raise `FetchFailed` on a failed attempt."""

    def describe(self) -> dict:
        """What the manifest records about the source (never a credential)."""


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*@")


def redact_url(text: str) -> str:
    """`text` with the userinfo of every URL in it removed (`http://user:token@host/x` -> `http://host/x`).

    Applied to every URL this package stores or logs: an endpoint such as `HF_ENDPOINT=http://user:token@host`
    carries a credential that must not reach a manifest, a log line or a summary."""
    return _USERINFO.sub(r"\g<scheme>", str(text))


# Loggers of the HTTP stack that put request URLs, userinfo included, into their messages.
_URL_LOGGERS = ("httpx2", "httpx", "huggingface_hub", "huggingface_hub.utils._http", "huggingface_hub.file_download")


class _RedactUrls(logging.Filter):
    """Rewrites a record's message without URL userinfo; installed on `_URL_LOGGERS` once an endpoint has some."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_url(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _redact_http_logs() -> None:
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactUrls) for f in logger.filters):
            logger.addFilter(_RedactUrls())


def _check_relative(path: str, where: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SourceError(f"{where}: refusing unsafe path {path!r} in the listing")
    return path


def _retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: `Retry-After` (delta-seconds or HTTP date), else the reset time of
    an exhausted `RateLimit` header (the Hub's `"resolvers";r=0;t=55`)."""
    from huggingface_hub.utils import parse_ratelimit_headers

    value = headers.get("Retry-After")
    if not value:
        limit = parse_ratelimit_headers(headers)
        return float(limit.reset_in_seconds) if limit is not None and limit.remaining == 0 else None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HubSource:
    """A Hugging Face Hub repo, listed and downloaded with `huggingface_hub`.

    Args:
        repo_id: `owner/name`. Default: `cerebras/SlimPajama-627B`.
        revision: branch, tag or commit; resolved to a commit sha once, and every request then uses that sha.
            Default: the pinned SlimPajama commit.
        repo_type: `dataset` or `model`. Default: `dataset`.
        endpoint: Hub URL. Default: `HF_ENDPOINT` read now (not at import), else `https://huggingface.co`.
        token: access token. Default: `HF_TOKEN`, else the token saved by `hf auth login`. Never logged or
            written anywhere; the client sends it to the Hub only, not to the CDN it redirects to.
        timeout: seconds for the revision request (the shared client has none, so an unreachable Hub would
            hang). Default: 60.
    """

    def __init__(self, repo_id: str = DEFAULT_REPO_ID, revision: str = DEFAULT_REVISION, *,
                 repo_type: str = "dataset", endpoint: str | None = None, token: str | None = None,
                 timeout: float = 60.0) -> None:
        from huggingface_hub import HfApi, get_token

        if repo_type not in ("dataset", "model"):
            raise SourceError(f"repo_type must be 'dataset' or 'model', got {repo_type!r}")
        self.repo_id = repo_id
        self.revision = revision
        self.repo_type = repo_type
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        if redact_url(self.endpoint) != self.endpoint:
            _redact_http_logs()  # the HTTP client logs each request's URL, credential included
        self._token = token if token is not None else get_token()
        self._api = HfApi(endpoint=self.endpoint, token=self._token or False)
        self._commit: str | None = None
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"HubSource({self.repo_id!r}, revision={self.revision!r}, endpoint={redact_url(self.endpoint)!r})"

    def describe(self) -> dict:
        return {"kind": "hub", "repo_id": self.repo_id, "repo_type": self.repo_type, "revision": self.revision,
                "commit": self._commit, "endpoint": redact_url(self.endpoint)}

    def _where(self) -> str:
        return f"{redact_url(self.endpoint)} {self.repo_type} {self.repo_id}@{self.revision}"

    def _listing_error(self, exc: Exception, what: str) -> SourceError | FetchFailed:
        """A listing error as a message that says what to do, without the token.

        429, 5xx and transport errors come back as a retryable `FetchFailed` (the caller retries the listing);
        the rest are a `SourceError`, which no retry fixes.
        """
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        response = exc.response if isinstance(exc, HfHubHTTPError) else None
        status = response.status_code if response is not None else None
        if status in (401, 403):
            sent = "a token was sent but is not allowed" if self._token else "no token was sent"
            return SourceError(f"{self._where()}: access denied (HTTP {status}) while {what}; {sent}. "
                               "Set HF_TOKEN to a token that can read this repo (and accept its terms on the Hub).")
        if status == 404:
            return SourceError(f"{self._where()}: not found (HTTP 404) while {what}: check the repo id, revision "
                               "and split/chunk selection")
        if response is not None:
            server_says = response.headers.get("X-Error-Message") or response.reason_phrase
            detail = f"HTTP {status} ({server_says}) from {response.url}"
        else:
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        message = f"{self._where()}: {what} failed: {redact_url(detail)}"
        if status in (408, 429) or (status or 0) >= 500 or isinstance(exc, httpx2.TransportError):
            retry_after = _retry_after(response.headers) if response is not None else None
            return FetchFailed(message, retryable=True, retry_after=retry_after)
        return SourceError(message)

    def resolve(self) -> str:
        """Commit sha of `revision` (one request, then cached).

        Raises `SourceError`, or `FetchFailed` when retrying may help (429, 5xx, network)."""
        if self._commit is None:
            try:
                info = self._api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type,
                                           timeout=self._timeout)
            except Exception as exc:  # every failure is classified: retryable or not, never a raw traceback
                raise self._listing_error(exc, "resolving the revision") from None
            if not info.sha:
                raise SourceError(f"{self._where()}: the Hub returned no commit sha for the revision")
            self._commit = info.sha
        return self._commit

    def list(self, selection: Selection) -> list[RemoteFile]:
        """List the selection's folders recursively (1000 entries per request) and apply the selection."""
        from huggingface_hub.hf_api import RepoFile

        commit = self.resolve()
        files: list[RemoteFile] = []
        for prefix in selection.prefixes():
            try:
                entries = list(self._api.list_repo_tree(self.repo_id, prefix or None, recursive=True,
                                                        revision=commit, repo_type=self.repo_type))
            except Exception as exc:  # every failure is classified: retryable or not, never a raw traceback
                raise self._listing_error(exc, f"listing {prefix or '/'!r}") from None
            for entry in entries:
                if not isinstance(entry, RepoFile):
                    continue  # a folder
                path = _check_relative(entry.path, self._where())
                sha256 = entry.lfs.sha256 if entry.lfs is not None else None
                files.append(RemoteFile(path, int(entry.size), sha256, None if sha256 else entry.blob_id))
        return selection.apply(files)

    def fetch(self, file: RemoteFile, out: BinaryIO, offset: int, on_bytes: Callable[[int], None],
              timeout: tuple[float, float]) -> None:
        """GET `resolve/{commit}/{path}` (following the CDN redirect) from `offset` with a Range header.

        If the server ignores the Range (200 instead of 206), `out` is rewound to where this file started.
        """
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.repo_id, file.path, repo_type=self.repo_type, revision=self.resolve(),
                         endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token or False)
        headers["Accept-Encoding"] = "identity"  # sizes and Range offsets must be of the stored bytes
        if offset:
            headers["Range"] = f"bytes={offset}-"
        start = out.tell() - offset
        try:
            with get_session().stream("GET", url, headers=headers,
                                      timeout=httpx2.Timeout(timeout[1], connect=timeout[0])) as response:
                status = response.status_code
                if status >= 400:
                    on_hub = redact_url(response.url).startswith(redact_url(self.endpoint) + "/")
                    message = f"{file.path}: HTTP {status} from {'the Hub' if on_hub else response.url.host}"
                    if status in (401, 403) and on_hub:
                        sent = "a token was sent but is not allowed" if self._token else "no token was sent"
                        raise SourceError(f"{self._where()}: access denied (HTTP {status}) downloading "
                                          f"{file.path}; {sent}. Set HF_TOKEN to a token that can read this repo.")
                    retryable = status in (403, 408, 409, 425, 429) or status >= 500
                    raise FetchFailed(message, retryable=retryable,
                                      retry_after=_retry_after(response.headers))
                if offset and status == 200:
                    out.seek(start)
                    out.truncate()
                    on_bytes(-offset)
                # No chunk size: bytes are written as they arrive, so a cut-off body leaves a partial to resume.
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    on_bytes(len(chunk))
        except httpx2.TransportError as exc:  # timeouts, resets, bodies shorter than Content-Length
            raise FetchFailed(f"{file.path}: {type(exc).__name__}: {redact_url(exc)}", retryable=True) from None


class LocalSource:
    """A directory, or any fsspec URL (`file:///...`, `s3://...`, `memory://...`), with the source's layout.

    Expected checksums come from a download manifest at its root (a directory filled by `download`), when
    there is one; otherwise sizes are checked and the sha256 of what was copied is recorded.

    Args:
        url: a path or fsspec URL of the root folder.
        storage_options: passed to fsspec (credentials for remote filesystems).
    """

    def __init__(self, url: str | Path, storage_options: dict | None = None) -> None:
        import fsspec

        self.url = str(url)
        self._fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self._root = root.rstrip("/") or "/"
        if not self._fs.isdir(self._root):
            raise SourceError(f"source {redact_url(self.url)}: not a directory")

    def __repr__(self) -> str:
        return f"LocalSource({redact_url(self.url)!r})"

    def describe(self) -> dict:
        # Normalized (`file:///abs/path`), so the same folder is recognized however it was typed.
        return {"kind": "local", "url": redact_url(self._fs.unstrip_protocol(self._root))}

    def resolve(self) -> None:
        return None

    def _checksums(self) -> dict[str, dict]:
        path = f"{self._root}/{MANIFEST_NAME}"
        if not self._fs.isfile(path):
            return {}
        try:
            manifest = json.loads(self._fs.cat_file(path))
        except (OSError, ValueError) as exc:
            raise SourceError(f"source {redact_url(self.url)}: unreadable {MANIFEST_NAME}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return {}
        return manifest.get("files", {})

    def list(self, selection: Selection) -> list[RemoteFile]:
        checksums = self._checksums()
        files: list[RemoteFile] = []
        for prefix in selection.prefixes():
            base = f"{self._root}/{prefix}" if prefix else self._root
            if prefix and not self._fs.isdir(base):
                raise SourceError(f"source {redact_url(self.url)}: no folder {prefix!r} "
                                  "(check the split/chunk selection)")
            for full, info in self._fs.find(base, detail=True, withdirs=False).items():
                path = _check_relative(full[len(self._root):].lstrip("/"), f"source {redact_url(self.url)}")
                if path == MANIFEST_NAME or any(part.startswith(".") for part in path.split("/")):
                    continue  # our own bookkeeping (manifest, `.incomplete/` partial files) is not data
                known = checksums.get(path, {})
                sha256 = known.get("sha256") if known.get("size") == info["size"] else None
                files.append(RemoteFile(path, int(info["size"]), sha256))
        return selection.apply(files)

    def fetch(self, file: RemoteFile, out: BinaryIO, offset: int, on_bytes: Callable[[int], None],
              timeout: tuple[float, float]) -> None:
        try:
            with self._fs.open(f"{self._root}/{file.path}", "rb") as src:
                src.seek(offset)
                while chunk := src.read(_CHUNK_SIZE):
                    out.write(chunk)
                    on_bytes(len(chunk))
        except FileNotFoundError:
            raise FetchFailed(f"{file.path}: no longer in {redact_url(self.url)}", retryable=False) from None
        except OSError as exc:
            raise FetchFailed(f"{file.path}: {type(exc).__name__}: {exc}", retryable=True) from None


def open_source(spec: str | Path, revision: str = DEFAULT_REVISION, **kwargs) -> HubSource | LocalSource:
    """A source from what a user typed: a URL (`file://`, `s3://`...) or an existing folder is a `LocalSource`,
    `owner/name` is a Hub repo.

    Args:
        spec: the source. Default in callers: `cerebras/SlimPajama-627B`.
        revision: Hub revision (ignored for folders).
        **kwargs: `HubSource` keyword arguments (`repo_type`, `endpoint`, `token`).
    """
    text = str(spec)
    if "://" in text or Path(text).is_dir():
        return LocalSource(text)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return HubSource(text, revision, **kwargs)
    raise SourceError(f"source {text!r}: neither an existing folder, a URL, nor a Hub repo id 'owner/name'")

