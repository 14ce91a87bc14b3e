"""One data file as a local path: a path, an fsspec URL, or a file of a Hugging Face Hub repo.

    path = fetch_file("hf://datasets/PygmalionAI/PIPPA/pippa_deduped.jsonl", ".state/chat-data")

A Hub file goes through the download stage's machinery (`HubSource` + `download`), so it gets the same
guarantees: the token of `HF_TOKEN` (never logged), the sha256 (LFS) or git blob id the Hub lists checked
before the file reaches its path, a partial file continued with a Range request, retries with backoff. It is
cached per repo and revision name under `cache_dir`: once verified it is returned without any request, so a
branch name keeps the bytes first fetched for it (a run's data do not change under it); name a commit
(`hf://datasets/<repo>@<sha>/<file>`) to pin another version, or delete the folder to fetch again.
"""

from __future__ import annotations

import glob
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from data_prep.atomic import atomic_path
from data_prep.download import Manifest, RetryPolicy, download
from data_prep.errors import SourceError
from data_prep.source import MANIFEST_NAME, HubSource, Selection, redact_url

__all__ = ["HubFileRef", "parse_hub_url", "fetch_hub_file", "fetch_file"]

_KINDS = {"datasets": "dataset", "models": "model"}


@dataclass(frozen=True)
class HubFileRef:
    """A file of a Hub repo, as named by `hf://[datasets/]<owner>/<name>[@<revision>]/<path>`.

    Args:
        repo_type: `dataset` or `model` (`hf://` without `datasets/` names a model repo, as huggingface_hub's
            file system does).
        repo_id: `owner/name`.
        revision: branch, tag or commit. Default in URLs: `main`.
        path: the file's path in the repo, `/`-separated.
    """

    repo_type: str
    repo_id: str
    revision: str
    path: str


def parse_hub_url(uri: str) -> HubFileRef:
    """The repo, revision and file an `hf://` URL names.

    Raises:
        SourceError: not an `hf://` URL of one file of a dataset or model repo.
    """
    rest = uri.removeprefix("hf://")
    kind, _, tail = rest.partition("/")
    repo_type = _KINDS.get(kind)
    if repo_type is None:
        repo_type, tail = "model", rest
    parts = tail.split("/")
    if not uri.startswith("hf://") or len(parts) < 3 or not all(parts):
        raise SourceError(f"{uri}: not a Hub file URL; expected hf://datasets/<owner>/<name>[@<revision>]/<file>")
    name, _, revision = parts[1].partition("@")
    return HubFileRef(repo_type, f"{parts[0]}/{name}", revision or "main", "/".join(parts[2:]))


def fetch_hub_file(ref: HubFileRef, cache_dir: str | Path, *, retry: RetryPolicy | None = None) -> Path:
    """The verified local copy of a Hub file, fetched into `cache_dir` unless an earlier call verified it.

    Args:
        ref: which file (`parse_hub_url`).
        cache_dir: cache root; the file lands in `<cache_dir>/hf/<repo_type>s/<repo_id>/<revision>/<path>`
            beside the download manifest that records its checksum.
        retry: attempts, backoff and timeouts. Default: `RetryPolicy()`.

    Raises:
        SourceError: the repo, revision or file does not exist, or access is denied.
        DownloadError: the file could not be fetched or failed verification after every retry.
    """
    out = Path(cache_dir) / "hf" / f"{ref.repo_type}s" / ref.repo_id / quote(ref.revision, safe="")
    source = HubSource(ref.repo_id, ref.revision, repo_type=ref.repo_type)
    local = out / ref.path
    entry = Manifest(out / MANIFEST_NAME, source.describe()).files.get(ref.path)
    if entry is not None and local.stat().st_size == entry["size"]:
        return local
    # The selection is this one file: its name escaped, so `[`, `*` or `?` in it match only themselves.
    summary = download(source, out, Selection(globs=(glob.escape(ref.path),)), workers=1, retry=retry,
                       progress=False)
    if summary.selected != 1:
        raise SourceError(f"{redact_url(source.endpoint)} {ref.repo_type} {ref.repo_id}@{ref.revision}: "
                          f"no file {ref.path!r}")
    return local


def fetch_file(uri: str, cache_dir: str | Path, *, retry: RetryPolicy | None = None) -> Path:
    """A local path for `uri`: a path or `file://` URL as it is, an `hf://` URL through `fetch_hub_file`,
    any other fsspec URL (`s3://`, `https://`...) copied once into `<cache_dir>/<file name>`.

    Raises:
        SourceError, DownloadError: a Hub file that cannot be fetched and verified (see `fetch_hub_file`).
    """
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("hf://"):
        return fetch_hub_file(parse_hub_url(uri), cache_dir, retry=retry)
    import fsspec

    dest = Path(cache_dir) / Path(uri.split("://", 1)[1]).name
    if not dest.is_file():
        with atomic_path(dest) as tmp, fsspec.open(uri, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)  # streamed: a data file may not fit in memory
    return dest
