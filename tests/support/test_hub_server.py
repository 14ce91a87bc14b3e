"""The Hub stand-in answers `huggingface_hub`'s own client calls the way the Hub does.

These use the unmodified client (`HfApi`, `hf_hub_download`, `get_hf_file_metadata`) with an explicit endpoint,
so a route or header the client needs but the stand-in lacks fails here rather than in a data test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from tests.support.hub_server import Fault, HubStandIn, hub, hub_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # real HTTP servers on 127.0.0.1

REPO = "org/tiny-slimpajama"


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for split, n in (("train/chunk1", 3), ("train/chunk2", 2), ("validation/chunk1", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            (root / split / f"example_{i}.jsonl.zst").write_bytes(f"{split}/{i}".encode() * (50 + i))
    (root / "README.md").write_text("# tiny\n")
    return root


def test_repo_info_and_paginated_tree(hub: HubStandIn, repo_dir: Path) -> None:
    repo = hub.add_repo(REPO, repo_dir)
    hub.page_size = 2
    api = HfApi(endpoint=hub.url, token=False)
    info = api.dataset_info(REPO, revision="main", files_metadata=True)
    assert info.sha == repo.commit
    assert {s.rfilename for s in info.siblings} == set(repo.files)

    files = [e for e in api.list_repo_tree(REPO, recursive=True, repo_type="dataset", revision=repo.commit)
             if hasattr(e, "lfs")]
    assert sorted(f.path for f in files) == sorted(repo.files)
    # 6 data files + README + 5 directories at 2 per page: the client followed every Link header.
    assert hub.count(route="tree") == 6
    lfs = {f.path: f.lfs.sha256 for f in files if f.lfs}
    assert lfs == {p: f.sha256 for p, f in repo.files.items() if p.endswith(".zst")}

    chunk = list(api.list_repo_tree(REPO, "train/chunk2", repo_type="dataset"))
    assert [e.path for e in chunk] == ["train/chunk2/example_0.jsonl.zst", "train/chunk2/example_1.jsonl.zst"]

    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree(REPO, repo_type="dataset", revision="nope"))


def test_paths_info_reports_lfs_sha256(hub: HubStandIn, repo_dir: Path) -> None:
    repo = hub.add_repo(REPO, repo_dir)
    api = HfApi(endpoint=hub.url, token=False)
    path = "train/chunk1/example_2.jsonl.zst"
    infos = api.get_paths_info(REPO, [path, "train", "missing.txt"], repo_type="dataset")
    by_path = {i.path: i for i in infos}
    assert set(by_path) == {path, "train"}
    assert by_path[path].lfs.sha256 == hashlib.sha256((repo_dir / path).read_bytes()).hexdigest()
    assert by_path[path].size == repo.files[path].size


def test_head_metadata_stops_at_cdn_redirect(hub: HubStandIn, repo_dir: Path) -> None:
    repo = hub.add_repo(REPO, repo_dir)
    path = "train/chunk1/example_0.jsonl.zst"
    url = hf_hub_url(REPO, path, repo_type="dataset", revision="main", endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=False, endpoint=hub.url)
    assert meta.commit_hash == repo.commit
    assert meta.etag == repo.files[path].sha256
    assert meta.size == repo.files[path].size
    assert meta.location.startswith(hub.cdn_url)
    assert hub.count(route="cdn") == 0


def test_hf_hub_download_with_token_range_and_retry(hub: HubStandIn, repo_dir: Path, tmp_path: Path) -> None:
    hub.add_repo(REPO, repo_dir)
    hub.token = "hf_standin_secret"
    path = "train/chunk1/example_1.jsonl.zst"
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token=False).dataset_info(REPO)
    assert info.value.response.status_code == 401

    # A truncated body: the client retries and still gets the right bytes.
    hub.inject(Fault("truncate", routes=("cdn",)))
    local = hf_hub_download(REPO, path, repo_type="dataset", local_dir=tmp_path / "out", endpoint=hub.url,
                            token="hf_standin_secret")
    assert Path(local).read_bytes() == (repo_dir / path).read_bytes()
    cdn = [r for r in hub.requests if r.route == "cdn"]
    assert [r.fault for r in cdn] == ["truncate", None]
    assert cdn[1].status in (200, 206)
    # The token went to the Hub routes, never to the CDN origin.
    assert all(r.authorized for r in hub.requests if r.route == "resolve")
    assert not any(r.authorized for r in cdn)


def test_status_faults_and_retry_after(hub: HubStandIn, repo_dir: Path) -> None:
    hub.add_repo(REPO, repo_dir)
    hub.inject(Fault("status", status=429, retry_after="7", routes=("revision",), times=1))
    response = httpx2.get(f"{hub.url}/api/datasets/{REPO}")
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert httpx2.get(f"{hub.url}/api/datasets/{REPO}").status_code == 200

    hub.inject(Fault("wrong_bytes", routes=("cdn",), path="*example_0*", times=None))
    path = "train/chunk2/example_0.jsonl.zst"
    body = httpx2.get(f"{hub.url}/datasets/{REPO}/resolve/main/{path}", follow_redirects=True).content
    good = (repo_dir / path).read_bytes()
    assert len(body) == len(good) and body != good
