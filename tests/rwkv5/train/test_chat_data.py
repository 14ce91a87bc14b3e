"""`resolve_chat_data` of a Hub dataset file, against the Hub stand-in serving the project's PIPPA-format sample
as `PygmalionAI/PIPPA` `pippa_deduped.jsonl`: fetched and verified, cached (no request the second time),
resumed from a partial file, a corrupted download refused, the token sent and never logged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from data_prep.download import RetryPolicy
from data_prep.errors import DownloadError, SourceError
from data_prep.fetch import fetch_file
from rwkv5.errors import DataError
from rwkv5.train.chat import read_chat_jsonl, resolve_chat_data
from tests.support.hub_server import Fault, HubStandIn, hub, hub_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # a real HTTP server on 127.0.0.1

PIPPA = Path(__file__).resolve().parents[2] / "data" / "pippa-sample.jsonl"  # tests/data/README.md: origin
URI = "hf://datasets/PygmalionAI/PIPPA/pippa_deduped.jsonl"
# Millisecond backoff keeps fault tests fast.
FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, connect_timeout=5.0, read_timeout=5.0)


@pytest.fixture
def pippa(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubStandIn:
    """The stand-in serving the sample as the PIPPA repo (stored through LFS, as the Hub stores it)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PIPPA, repo / "pippa_deduped.jsonl")
    (repo / "README.md").write_text("---\nlicense: apache-2.0\n---\n# PIPPA stand-in\n")
    hub.add_repo("PygmalionAI/PIPPA", repo, lfs_patterns=("*.jsonl",))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def test_a_hub_file_is_fetched_verified_and_cached(pippa, tmp_path):
    cache = tmp_path / "cache"
    path = resolve_chat_data(URI, cache)
    assert path.read_bytes() == PIPPA.read_bytes()
    assert path.is_relative_to(cache) and len(read_chat_jsonl(path)) == 8
    assert pippa.downloads() == ["pippa_deduped.jsonl"]  # only the asked file, not the README

    seen = len(pippa.requests)
    assert resolve_chat_data(URI, cache) == path
    assert len(pippa.requests) == seen  # verified before: no request at all


def test_a_partial_download_is_resumed(pippa, tmp_path):
    cache = tmp_path / "cache"
    pippa.inject(Fault("truncate", path="pippa_deduped.jsonl", times=None))
    with pytest.raises(DownloadError, match="pippa_deduped.jsonl"):
        fetch_file(URI, cache, retry=FAST)  # every attempt cut short: a partial file stays behind
    pippa.faults.clear()
    before = len(pippa.requests)

    path = fetch_file(URI, cache, retry=FAST)
    assert path.read_bytes() == PIPPA.read_bytes()
    ranged = [r for r in pippa.requests[before:] if r.route in ("resolve", "cdn") and r.method == "GET"]
    assert ranged and all(r.range and r.range != "bytes=0-" for r in ranged), ranged


def test_corrupted_bytes_fail_verification(pippa, tmp_path):
    pippa.inject(Fault("wrong_bytes", path="pippa_deduped.jsonl", times=None))
    with pytest.raises(DownloadError, match=r"pippa_deduped.jsonl: sha256 [0-9a-f]{64} differs from the source's"):
        fetch_file(URI, tmp_path / "cache", retry=FAST)
    assert not list((tmp_path / "cache").rglob("pippa_deduped.jsonl"))  # nothing unverified left to read


def test_the_token_is_sent_and_never_logged(pippa, tmp_path, monkeypatch, caplog):
    pippa.token = "hf_secret_token_123"
    with pytest.raises(SourceError, match="no token was sent"):
        resolve_chat_data(URI, tmp_path / "denied")
    monkeypatch.setenv("HF_TOKEN", pippa.token)
    with caplog.at_level(logging.DEBUG):
        path = resolve_chat_data(URI, tmp_path / "cache")
    assert path.read_bytes() == PIPPA.read_bytes()
    assert any(r.authorized for r in pippa.requests if r.route == "resolve")
    assert not any(r.authorized for r in pippa.requests if r.route == "cdn")  # not forwarded off the Hub
    assert pippa.token not in caplog.text
    assert not any(pippa.token in p.read_text(errors="replace") for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_a_missing_file_or_path_is_named(pippa, tmp_path):
    with pytest.raises(SourceError, match="no file 'pippa.jsonl'"):
        resolve_chat_data("hf://datasets/PygmalionAI/PIPPA/pippa.jsonl", tmp_path)
    with pytest.raises(DataError, match="nowhere.jsonl: chat data file not found"):
        resolve_chat_data(str(tmp_path / "nowhere.jsonl"), tmp_path)
    assert resolve_chat_data(f"file://{PIPPA}", tmp_path) == PIPPA
