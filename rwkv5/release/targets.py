"""Where a release goes: a local folder, any fsspec URL, or a Hugging Face Hub repo, behind one interface.

A target lists what it holds (path, size and, where the store knows it without a download, a content hash),
opens a file for reading, and uploads a set of files from a local release folder. `rwkv5.release.publish` builds on
these three verbs: it uploads what is missing or different and the manifest last, so a release whose manifest
is present is complete, and a re-run uploads nothing.

URLs (`open_target`):
    `path/to/dir`, `file:///abs/dir`: a local folder; each file lands by temp file + rename.
    `hf://[models/|datasets/]org/name[@revision]`: a Hub repo (`huggingface_hub`), created private unless told
        otherwise; a revision other than `main` is a branch created from `main`. The token comes from `HF_TOKEN`
        (or the `huggingface_hub` login), is passed to the client only, and never appears in a message.
    anything else fsspec understands (`s3://bucket/prefix`, `gs://...`, `memory://...`): through fsspec;
        `storage_options` reach the filesystem (for S3 e.g. `client_kwargs={"endpoint_url": ...}`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from data_prep.atomic import atomic_path
from rwkv5.errors import Rwkv5Error

__all__ = [
    "ReleaseError",
    "RemoteFile",
    "ReleaseTarget",
    "LocalTarget",
    "FsspecTarget",
    "HubTarget",
    "open_target",
]


class ReleaseError(Rwkv5Error):
    """A release cannot be built, uploaded or verified; the message names the target and the file."""


@dataclass(frozen=True)
class RemoteFile:
    """One file a target holds.

    Args:
        path: `/`-separated path under the release root.
        size: bytes.
        sha256: content sha256 when the store reports it without a download (Hub LFS/xet files), else None.
    """

    path: str
    size: int
    sha256: str | None = None


class ReleaseTarget(ABC):
    """A place that holds release folders. `url` names it in messages and in the model registry."""

    url: str

    def prepare(self) -> None:
        """Create what must exist before files are uploaded (a bucket prefix needs nothing; a Hub repo does)."""

    @abstractmethod
    def list_files(self) -> dict[str, RemoteFile]:
        """Every file under the release root, keyed by its relative path."""

    @abstractmethod
    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open a file under the release root for reading (a context manager yielding a binary file)."""

    @abstractmethod
    def upload(self, root: Path, paths: Sequence[str], message: str) -> None:
        """Upload `root / p` to `p` for each path, replacing what is there; `message` labels a Hub commit."""

    def uri(self, path: str = "") -> str:
        """URL of a file under the release root (or of the root itself)."""
        return f"{self.url.rstrip('/')}/{path}" if path else self.url


class LocalTarget(ReleaseTarget):
    """A folder on this machine (or a mounted share)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def list_files(self) -> dict[str, RemoteFile]:
        if not self.root.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): RemoteFile(p.relative_to(self.root).as_posix(), p.stat().st_size)
                for p in sorted(self.root.rglob("*")) if p.is_file() and not p.name.startswith(".")}

    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return open(self.root / path, "rb")

    def upload(self, root: Path, paths: Sequence[str], message: str) -> None:
        for path in paths:
            # Temp file + rename: a reader never sees half a file, a crash leaves the old one.
            with atomic_path(self.root / path) as tmp:
                shutil.copyfile(root / path, tmp)


class FsspecTarget(ReleaseTarget):
    """Any fsspec filesystem; each file is one `put_file` (a single atomic object write on S3)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ReleaseError(f"{url}: no fsspec filesystem for this URL: {exc}") from None
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def _remote(self, path: str) -> str:
        return f"{self.root}/{path}"

    def list_files(self) -> dict[str, RemoteFile]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        out = {}
        for name, info in found.items():
            if info.get("type", "file") != "file" or not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            out[rel] = RemoteFile(rel, int(info["size"]))
        return out

    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.fs.open(self._remote(path), "rb")

    def upload(self, root: Path, paths: Sequence[str], message: str) -> None:
        for path in paths:
            self.fs.put_file(str(root / path), self._remote(path))
        self.fs.invalidate_cache(self.root)


_HUB_URL = re.compile(r"^hf://(?:(?P<kind>models|datasets|spaces)/)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^/]+))?/?$")


class HubTarget(ReleaseTarget):
    """A Hugging Face Hub repo at one revision; each upload is one commit (atomic on the Hub).

    Args:
        url: `hf://[models/|datasets/]org/name[@revision]`.
        endpoint: Hub URL. Default: `HF_ENDPOINT` or the public Hub.
        token: Hub token. Default: `HF_TOKEN` or the saved login.
        private: visibility of a repo this target creates. Default: True.
    """

    def __init__(self, url: str, *, endpoint: str | None = None, token: str | None = None,
                 private: bool = True) -> None:
        from huggingface_hub import HfApi

        match = _HUB_URL.match(url)
        if match is None:
            raise ReleaseError(f"{url}: not a Hub URL; expected hf://[models/|datasets/]org/name[@revision]")
        self.repo_id = match["repo"]
        self.repo_type = (match["kind"] or "models")[:-1]
        self.revision = match["rev"] or "main"
        self.private = private
        self.url = url.rstrip("/")
        self.api = HfApi(endpoint=endpoint, token=token)
        self._endpoint = endpoint

    def prepare(self) -> None:
        self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
        if self.revision != "main":
            self.api.create_branch(self.repo_id, repo_type=self.repo_type, branch=self.revision, exist_ok=True)

    def list_files(self) -> dict[str, RemoteFile]:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            entries = list(self.api.list_repo_tree(self.repo_id, repo_type=self.repo_type, revision=self.revision,
                                                   recursive=True))
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return {}
        out = {}
        for e in entries:
            if not hasattr(e, "size") or e.path.rsplit("/", 1)[-1].startswith("."):
                continue  # folders, and the .gitattributes every Hub repo starts with
            lfs = getattr(e, "lfs", None)
            out[e.path] = RemoteFile(e.path, int(e.size), sha256=lfs.sha256 if lfs else None)
        return out

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        from huggingface_hub import hf_hub_download

        # A private cache per read: a cached copy would hide a file that changed on the Hub.
        with tempfile.TemporaryDirectory(prefix="rwkv5-release-") as tmp:
            local = hf_hub_download(self.repo_id, path, repo_type=self.repo_type, revision=self.revision,
                                    cache_dir=tmp, endpoint=self._endpoint, token=self.api.token,
                                    force_download=True)
            with open(local, "rb") as f:
                yield f

    def upload(self, root: Path, paths: Sequence[str], message: str) -> None:
        from huggingface_hub import CommitOperationAdd

        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in paths]
        self.api.create_commit(self.repo_id, ops, commit_message=message, repo_type=self.repo_type,
                               revision=self.revision)


def open_target(
    url: str | os.PathLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = True,
) -> ReleaseTarget:
    """The target a URL names (see the module docstring). Hub options apply to `hf://` only, fsspec's to others."""
    text = os.fspath(url)
    if text.startswith("hf://"):
        return HubTarget(text, endpoint=endpoint, token=token, private=private)
    if text.startswith("file://"):
        return LocalTarget(text[len("file://"):])
    if "://" not in text:
        return LocalTarget(text)
    return FsspecTarget(text, storage_options)
