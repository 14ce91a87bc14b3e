"""Download from the Hub stand-in (and from folders): complete, resumable, verified, and robust to faults.

The stand-in is a real HTTP server driven by the unmodified `huggingface_hub` client; retries use millisecond
backoff here so fault tests stay fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zstandard

from data_prep.download import DownloadSummary, RetryPolicy, download
from data_prep.errors import DownloadError, SelectionError, SourceError
from data_prep.source import MANIFEST_NAME, HubSource, LocalSource, RemoteFile, Selection, open_source
from tests.support.hub_server import Fault, HubStandIn, hub, hub_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # real HTTP servers on 127.0.0.1

REPO = "cerebras/SlimPajama-627B"
# Millisecond backoff keeps fault tests fast; the read timeout stays well above a loaded CI machine's stalls.
FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, connect_timeout=5.0, read_timeout=2.0)
SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
        "RedPajamaWikipedia", "RedPajamaStackExchange"]
LAYOUT = {"train/chunk1": 3, "train/chunk2": 2, "validation/chunk1": 2, "test/chunk1": 1}


def _jsonl_zst(seed: int, docs: int = 20) -> bytes:
    """A SlimPajama-like file: JSON lines in two zstd frames (real files may hold several)."""
    lines = [json.dumps({"text": f"document {seed}-{i} " + "lorem ipsum " * (i + seed % 5),
                         "meta": {"redpajama_set_name": SETS[(seed + i) % len(SETS)]}})
             for i in range(docs)]
    half = len(lines) // 2
    compressor = zstandard.ZstdCompressor(level=3)
    return b"".join(compressor.compress(("\n".join(part) + "\n").encode()) for part in (lines[:half], lines[half:]))


@pytest.fixture(scope="module")
def slim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slimpajama")
    seed = 0
    for folder, count in LAYOUT.items():
        split = folder.split("/")[0]
        kind = "train" if split == "train" else "holdout"
        (root / folder).mkdir(parents=True)
        for i in range(count):
            (root / folder / f"example_{kind}_{i}.jsonl.zst").write_bytes(_jsonl_zst(seed))
            seed += 1
    (root / "README.md").write_text("---\nlicense: other\n---\n# SlimPajama stand-in\n")
    return root


def _data_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jsonl.zst")
            if ".incomplete" not in p.parts}


@pytest.fixture
def served(hub: HubStandIn, slim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> HubStandIn:
    """The stand-in serving the generated repo, with `HF_ENDPOINT` pointing at it for this test only."""
    hub.add_repo(REPO, slim_dir)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def _source(revision: str = "main", token: str = "") -> HubSource:
    # token="" sends none (and ignores any token saved on the machine); HF_ENDPOINT is read at construction.
    return HubSource(REPO, revision, token=token)


def test_full_download_then_rerun_fetches_nothing(served: HubStandIn, slim_dir: Path, tmp_path: Path) -> None:
    served.page_size = 3  # the listing takes several pages
    out = tmp_path / "raw"
    summary = download(_source(), out, workers=4, retry=FAST, progress=False)

    expected = _data_files(slim_dir)
    assert _data_files(out) == expected
    assert not (out / "README.md").exists()  # default selection: data files only
    assert (summary.selected, summary.downloaded, summary.skipped, summary.failed) == (len(expected), 8, 0, 0)
    assert summary.verified == 8 and summary.bytes_received == sum(len(b) for b in expected.values())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["commit"] == served.repos[("dataset", REPO)].commit
    assert {p: e["sha256"] for p, e in manifest["files"].items()} == {
        p: hashlib.sha256(b).hexdigest() for p, b in expected.items()}
    assert all(e["checked"] == "sha256" for e in manifest["files"].values())
    assert sorted(served.downloads()) == sorted(expected)
    assert served.count(route="tree") > 1

    served.requests.clear()
    again = download(_source(), out, workers=4, retry=FAST, progress=False)
    assert (again.downloaded, again.adopted, again.skipped, again.bytes_received) == (0, 0, 8, 0)
    assert served.count(route="resolve") == 0 and served.count(route="cdn") == 0
    assert isinstance(again, DownloadSummary) and "skipped" in again.markdown()


def test_selection_lists_only_selected_folders(served: HubStandIn, tmp_path: Path) -> None:
    sel = Selection(splits=("train",), chunks=(2,))
    summary = download(_source(), tmp_path / "raw", sel, retry=FAST, progress=False)
    assert sorted(_data_files(tmp_path / "raw")) == ["train/chunk2/example_train_0.jsonl.zst",
                                                     "train/chunk2/example_train_1.jsonl.zst"]
    assert summary.selected == 2
    assert {r.path for r in served.requests if r.route == "tree"} == {"train/chunk2"}

    files = _source().list(Selection(splits=("validation", "test"), globs=("*_0.jsonl.zst",)))
    assert [f.path for f in files] == ["test/chunk1/example_holdout_0.jsonl.zst",
                                       "validation/chunk1/example_holdout_0.jsonl.zst"]
    assert all(f.sha256 and f.size for f in files)

    with pytest.raises(SourceError, match="404"):
        _source().list(Selection(splits=("train",), chunks=(7,)))


def test_fraction_is_deterministic_nested_and_proportional() -> None:
    files = [RemoteFile(f"train/chunk{c}/example_train_{i}.jsonl.zst", 10) for c in (1, 2) for i in range(500)]
    small = Selection(fraction=0.05).apply(files)
    large = Selection(fraction=0.2).apply(files)
    assert small == Selection(fraction=0.05).apply(list(reversed(files)))
    assert set(small) < set(large)
    assert 25 <= len(small) <= 80 and 150 <= len(large) <= 250
    assert set(Selection(fraction=0.05, seed=1).apply(files)) != set(small)
    assert len(Selection(fraction=1e-9).apply(files)) == 1  # a smoke run never selects nothing

    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(chunks=(1,)), dict(splits=("a/b",)),
                dict(splits=("train",), chunks=(0,))):
        with pytest.raises(SelectionError):
            Selection(**bad)


@pytest.mark.parametrize(
    "fault, server_wait",
    [
        pytest.param(Fault("status", status=500, times=2), 0.0, id="500"),
        pytest.param(Fault("status", status=503, routes=("resolve",), methods=("GET",), times=1), 0.0, id="503"),
        pytest.param(Fault("status", status=429, retry_after="2", times=1), 2.0, id="429-retry-after"),
        pytest.param(Fault("status", status=429, ratelimit_reset=2, times=1), 2.0, id="429-ratelimit-header"),
        pytest.param(Fault("truncate", times=2), 0.0, id="truncated"),
        pytest.param(Fault("slow", delay=6.0, times=1), 0.0, id="slow"),
        pytest.param(Fault("stall", delay=6.0, times=1), 0.0, id="stalled-mid-body"),
        pytest.param(Fault("wrong_bytes", times=1), 0.0, id="wrong-bytes"),
    ],
)
def test_injected_faults_are_survived(served: HubStandIn, slim_dir: Path, tmp_path: Path, fault: Fault,
                                      server_wait: float) -> None:
    fault.path = "train/chunk1/example_train_1.jsonl.zst"
    served.inject(fault)
    chunk1 = Selection(splits=("train",), chunks=(1,))  # 3 files keep eight fault runs cheap
    summary = download(_source(), tmp_path / "raw", chunk1, workers=2, retry=FAST, progress=False)
    assert _data_files(tmp_path / "raw") == {p: b for p, b in _data_files(slim_dir).items()
                                             if p.startswith("train/chunk1/")}
    assert fault.hits == fault.times and summary.retries >= fault.times
    assert summary.failed == 0 and summary.downloaded == 3
    tries = [r for r in served.requests if r.route == "resolve" and r.path == fault.path]
    if server_wait:  # the server's requested wait is honoured although backoff is in milliseconds
        assert tries[1].at - tries[0].at >= server_wait
    if fault.kind in ("truncate", "stall"):  # the partial file was resumed, not fetched again
        resumed = [r for r in served.requests if r.route == "cdn" and r.path == fault.path and r.range]
        assert resumed and all(r.status == 206 for r in resumed)


def test_listing_faults_are_retried_then_reported(served: HubStandIn, tmp_path: Path) -> None:
    served.inject(Fault("status", status=500, routes=("revision",), times=2),
                  Fault("status", status=429, retry_after="0", routes=("tree",), times=1))
    summary = download(_source(), tmp_path / "raw", retry=FAST, progress=False)
    assert summary.downloaded == 8 and all(f.hits == f.times for f in served.faults)

    served.inject(Fault("status", status=502, routes=("revision",), times=None))
    with pytest.raises(SourceError, match=rf"resolving the revision failed.*502.*gave up after {FAST.attempts}"):
        download(_source(), tmp_path / "raw", retry=FAST, progress=False)


def test_wrong_bytes_are_never_kept(served: HubStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = "validation/chunk1/example_holdout_1.jsonl.zst"
    served.inject(Fault("wrong_bytes", path=bad, times=None))
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"validation/chunk1/example_holdout_1\.jsonl\.zst.*sha256") as info:
        download(_source(), out, workers=3, retry=FAST, progress=False)
    summary = info.value.summary
    assert summary.failed == 1 and summary.downloaded == 7 and list(summary.failures) == [bad]
    assert f"gave up after {FAST.attempts} attempts" in summary.failures[bad]
    assert served.count(route="cdn", method="GET", path=bad) == FAST.attempts
    assert not (out / bad).exists()
    assert not list((out / ".incomplete").rglob("*.part"))
    assert bad not in json.loads((out / MANIFEST_NAME).read_text())["files"]

    served.faults.clear()
    served.requests.clear()
    fixed = download(_source(), out, workers=3, retry=FAST, progress=False)
    assert (fixed.downloaded, fixed.skipped) == (1, 7) and served.downloads() == [bad]


def test_local_copy_that_differs_is_replaced(served: HubStandIn, slim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    download(_source(), out, retry=FAST, progress=False)
    victim = out / "train/chunk1/example_train_0.jsonl.zst"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # same size: the size check alone would accept it
    victim.write_bytes(bytes(data))

    trusting = download(_source(), out, retry=FAST, progress=False)
    assert trusting.skipped == 8  # by default sizes + manifest are trusted (no 900 GB re-hash per run)
    checked = download(_source(), out, retry=FAST, progress=False, verify_existing=True)
    assert (checked.adopted, checked.downloaded) == (7, 1)
    assert _data_files(out) == _data_files(slim_dir)


def test_corrupt_copy_leaves_manifest_and_path_even_when_refetch_fails(served: HubStandIn, slim_dir: Path,
                                                                     tmp_path: Path) -> None:
    # Issue 18, bug 1: a failed refetch used to leave the corrupt file and its old manifest entry in place.
    out = tmp_path / "raw"
    download(_source(), out, retry=FAST, progress=False)
    bad = "train/chunk1/example_train_0.jsonl.zst"
    data = bytearray((out / bad).read_bytes())
    data[10] ^= 0xFF
    (out / bad).write_bytes(bytes(data))

    served.inject(Fault("status", status=500, times=None))
    with pytest.raises(DownloadError, match=bad) as info:
        download(_source(), out, retry=FAST, progress=False, verify_existing=True)
    assert info.value.summary.failures.keys() == {bad}
    assert not (out / bad).exists()
    assert bad not in json.loads((out / MANIFEST_NAME).read_text())["files"]

    served.faults.clear()
    fixed = download(_source(), out, retry=FAST, progress=False)
    assert (fixed.downloaded, fixed.skipped) == (1, 7)
    assert _data_files(out) == _data_files(slim_dir)


_CHILD = textwrap.dedent(
    """
    import sys
    from data_prep.download import RetryPolicy, download
    from data_prep.source import HubSource
    download(HubSource("{repo}", "main", token=""), sys.argv[1], workers=1, progress=False,
             retry=RetryPolicy(base_delay=0.01), manifest_interval=3600)
    """
)


def test_download_killed_midway_completes_on_rerun(served: HubStandIn, slim_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    served.inject(Fault("slow", delay=0.3, times=None))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=REPO), str(out)],
                             env={**os.environ, "HF_ENDPOINT": served.url}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90  # the child's imports alone take seconds on a loaded machine
    while len(served.downloads()) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    done_before = set(_data_files(out))
    assert 2 <= len(done_before) < 8

    served.faults.clear()
    served.requests.clear()
    summary = download(_source(), out, workers=2, retry=FAST, progress=False)
    assert _data_files(out) == _data_files(slim_dir)
    # Files the killed run finished were hashed and adopted, not fetched again.
    assert summary.adopted == len(done_before) and summary.downloaded == 8 - len(done_before)
    assert not set(served.downloads()) & done_before
    assert summary.bytes_received == sum(len(b) for p, b in _data_files(out).items() if p not in done_before)


def test_token_is_required_sent_and_never_written(served: HubStandIn, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture) -> None:
    secret = "hf_StandInSecretToken0123456789"
    served.token = secret
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError, match="HF_TOKEN") as denied:
        download(_source(), tmp_path / "a", retry=FAST, progress=False)
    assert "401" in str(denied.value) and "no token was sent" in str(denied.value)
    with pytest.raises(SourceError, match="a token was sent but is not allowed") as wrong:
        download(_source(token="hf_wrong_value_42"), tmp_path / "a", retry=FAST, progress=False)
    assert "hf_wrong_value_42" not in str(wrong.value)

    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "raw"
    summary = download(HubSource(REPO, "main"), out, workers=3, retry=FAST, progress=True)
    assert summary.downloaded == 8
    hub_routes = [r for r in served.requests if r.route in ("revision", "tree", "resolve") and r.status < 400]
    assert hub_routes and all(r.authorized for r in hub_routes)
    assert not any(r.authorized for r in served.requests if r.route == "cdn")  # not leaked to the CDN origin

    captured = capfd.readouterr()
    written = [caplog.text, captured.out, captured.err, (out / MANIFEST_NAME).read_text(),
               json.dumps(summary.to_dict()), summary.markdown(), repr(HubSource(REPO, "main"))]
    assert "download" in captured.err  # the progress bar ran
    assert not any(secret in text for text in written)


def test_endpoint_credential_is_never_stored_or_logged(served: HubStandIn, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture,
                                                       capfd: pytest.CaptureFixture) -> None:
    # Issue 18, bug 4: HF_ENDPOINT=http://user:token@host put the token into the download manifest.
    secret = "EndpointSecret0123456789"
    monkeypatch.setenv("HF_ENDPOINT", served.url.replace("://", f"://user:{secret}@"))
    caplog.set_level(logging.DEBUG)
    served.inject(Fault("status", status=500, routes=("tree",), methods=("GET",)),
                  Fault("status", status=503, times=2))  # listing and file errors log messages with URLs
    out = tmp_path / "raw"
    summary = download(_source(), out, workers=2, retry=FAST, progress=True)
    assert summary.downloaded == 8 and summary.retries >= 2
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["endpoint"] == served.url

    captured = capfd.readouterr()
    written = [caplog.text, captured.out, captured.err, (out / MANIFEST_NAME).read_text(),
               json.dumps(summary.to_dict()), summary.markdown(), repr(_source())]
    assert "500" in caplog.text  # the listing error was logged
    assert not any(secret in text for text in written)


def test_local_folder_source(slim_dir: Path, tmp_path: Path) -> None:
    sel = Selection(splits=("train",))
    first = download(LocalSource(slim_dir), tmp_path / "a", sel, progress=False)
    assert sorted(_data_files(tmp_path / "a")) == sorted(p for p in _data_files(slim_dir) if p.startswith("train/"))
    entries = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["files"]
    assert first.downloaded == 5 and {e["checked"] for e in entries.values()} == {"size"}
    assert entries["train/chunk2/example_train_1.jsonl.zst"]["sha256"] == hashlib.sha256(
        (slim_dir / "train/chunk2/example_train_1.jsonl.zst").read_bytes()).hexdigest()

    again = download(open_source(slim_dir.as_uri()), tmp_path / "a", sel, progress=False)
    assert (again.skipped, again.downloaded) == (5, 0)

    # A folder filled by `download` carries a manifest: copies from it are checked against its sha256.
    mirror = tmp_path / "a"
    (mirror / ".incomplete/train").mkdir(parents=True, exist_ok=True)
    (mirror / ".incomplete/train/x.jsonl.zst.part").write_bytes(b"partial")
    listed = [f.path for f in LocalSource(mirror).list(Selection(globs=()))]
    assert sorted(listed) == sorted(_data_files(mirror))  # no manifest, no partial files
    victim = mirror / "train/chunk1/example_train_2.jsonl.zst"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="example_train_2.*sha256") as info:
        download(open_source(f"file://{mirror}"), tmp_path / "b", sel, retry=FAST, progress=False)
    assert info.value.summary.downloaded == 4
    assert not (tmp_path / "b/train/chunk1/example_train_2.jsonl.zst").exists()
    b_entries = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())["files"]
    assert {e["checked"] for e in b_entries.values()} == {"sha256"}

    with pytest.raises(SourceError, match="no folder 'validation/chunk3'"):
        download(LocalSource(slim_dir), tmp_path / "c", Selection(splits=("validation",), chunks=(3,)))
    with pytest.raises(SourceError, match="holds files of"):
        download(_source_for_other_folder(tmp_path), tmp_path / "a", sel, progress=False)


class _OddNames(LocalSource):
    """A folder source whose listing also holds names no local file system takes (a Hub repo can list them)."""

    ODD = ["train/chunk1/nul\x00name.jsonl.zst", "train/chunk1/" + "n" * 300 + ".jsonl.zst"]

    def list(self, selection: Selection) -> list[RemoteFile]:
        return super().list(selection) + [RemoteFile(path, 10) for path in self.ODD]


def test_odd_remote_names_fail_in_one_line_and_the_rest_completes(slim_dir: Path, tmp_path: Path) -> None:
    # Issue 18, bug 3: a NUL or a 300-byte name ended the run with a raw ValueError / OSError 36.
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as info:
        download(_OddNames(slim_dir), out, retry=FAST, progress=False)
    message = str(info.value)
    assert "\n" not in message and "\x00" not in message
    assert "nul\\x00name.jsonl.zst: its name holds a control character" in message
    assert "310-byte component" in message and "n" * 300 not in message
    summary = info.value.summary
    assert summary.failed == 2 and summary.downloaded == 8 and set(summary.failures) == set(_OddNames.ODD)
    assert _data_files(out) == _data_files(slim_dir)
    assert "\x00" not in summary.markdown()


def _source_for_other_folder(tmp_path: Path) -> LocalSource:
    other = tmp_path / "other/train/chunk1"
    other.mkdir(parents=True)
    (other / "x.jsonl.zst").write_bytes(b"x")
    return LocalSource(tmp_path / "other")


def test_unknown_repo_and_revision_are_clear_errors(served: HubStandIn, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nobody/nothing.*404"):
        download(HubSource("nobody/nothing", "main", token=""), tmp_path, progress=False)
    with pytest.raises(SourceError, match=r"@v9.*404"):
        download(_source("v9"), tmp_path, progress=False)
    with pytest.raises(SourceError, match="neither an existing folder"):
        open_source("not a repo id")


def test_cli_download_from_a_folder(slim_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    out = tmp_path / "raw"
    args = ["data", "download", "--source", str(slim_dir), "--out", str(out), "--split", "validation",
            "--chunk", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(_data_files(out)) == ["validation/chunk1/example_holdout_0.jsonl.zst",
                                        "validation/chunk1/example_holdout_1.jsonl.zst"]
    assert "downloaded 2" in result.output

    bad = CliRunner().invoke(app, ["data", "download", "--source", str(tmp_path / "missing/dir/x"), "--out",
                                   str(out), "--no-progress"])
    assert bad.exit_code == 1 and "error:" in bad.output
