"""The offline sample corpus: SlimPajama layout, all seven sets in both splits, valid lines, determinism."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import zstandard

from data_prep.errors import SampleError
from data_prep.sample import SET_NAMES, SampleSpec, build_sample

SMALL = SampleSpec(
    megabytes=0.4, train_chunks=2, train_files_per_chunk=3, validation_chunks=2, validation_files_per_chunk=1
)
LAYOUT = re.compile(r"^(train/chunk[12]/example_train_[0-2]|validation/chunk[12]/example_holdout_0)\.jsonl\.zst$")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "corpus"
    return out, build_sample(out, SMALL)


def _data_files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.jsonl.zst"))}


def _frames(data: bytes) -> list[bytes]:
    """Decompress frame by frame (a decompressobj stops at the end of one frame)."""
    out = []
    while data:
        obj = zstandard.ZstdDecompressor().decompressobj()
        out.append(obj.decompress(data))
        data = obj.unused_data
    return out


def _records(path):
    return [json.loads(line) for line in b"".join(_frames(path.read_bytes())).decode("utf-8").splitlines()]


def test_layout_and_manifest(built):
    out, result = built
    files = _data_files(out)
    assert sorted(files) == sorted(result.manifest["files"])
    assert len(files) == 2 * 3 + 2 * 1
    assert all(LAYOUT.match(rel) for rel in files), sorted(files)
    assert not [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    for rel, path in files.items():
        entry = result.manifest["files"][rel]
        data = path.read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["documents"] == len(_records(path)) > 0
        assert entry["frames"] == len(_frames(data))
    assert json.loads((out / "manifest.json").read_text()) == result.manifest
    assert result.totals["documents"] == sum(e["documents"] for e in result.manifest["files"].values())
    # Some files hold several zstd frames, as real SlimPajama files may.
    assert {e["frames"] for e in result.manifest["files"].values()} >= {1, 3}


def test_every_line_and_every_set(built):
    out, result = built
    seen = {"train": set(), "validation": set()}
    text_bytes = 0
    for rel, path in _data_files(out).items():
        for record in _records(path):
            assert isinstance(record["text"], str) and record["text"].strip()
            name = record["meta"]["redpajama_set_name"]
            assert name in SET_NAMES
            seen[rel.split("/")[0]].add(name)
            text_bytes += len(record["text"].encode("utf-8"))
    assert seen == {"train": set(SET_NAMES), "validation": set(SET_NAMES)}
    assert text_bytes == result.totals["text_bytes"]
    assert 0.4e6 <= text_bytes < 0.4e6 * 1.5


def test_two_builds_are_byte_identical(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_sample(again, SMALL)
    ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert ours == theirs
    for rel in ours:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other_seed = build_sample(tmp_path / "seed1", SampleSpec(**{**SMALL.__dict__, "seed": 1}))
    assert other_seed.manifest["files"] != json.loads((out / "manifest.json").read_text())["files"]


def test_complete_build_is_left_alone_and_interrupted_one_is_finished(built, tmp_path):
    out, result = built
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert build_sample(out, SMALL).skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    with pytest.raises(SampleError, match="another --out"):
        build_sample(out, SampleSpec(**{**SMALL.__dict__, "megabytes": 0.5}))

    # A build killed before its manifest: one file missing, a temp file left over, the claim marker present.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "manifest.json").unlink()
    (broken / "train/chunk1/example_train_1.jsonl.zst").unlink()
    (broken / "train/chunk1/.example_train_2.jsonl.zst.99.tmp").write_bytes(b"partial")
    (broken / "train/chunk1/.example_train_3.jsonl.zst.tmp-99-0123abcd").write_bytes(b"partial")
    (broken / ".sample-building").touch()
    finished = build_sample(broken, SMALL)
    assert not finished.skipped
    assert (broken / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert sorted(p.name for p in broken.rglob("*") if p.is_file()) == sorted(
        p.name for p in out.rglob("*") if p.is_file()
    )

    # A complete build that lost a file is built again, not reported complete.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "validation/chunk2/example_holdout_0.jsonl.zst").unlink()
    assert not build_sample(damaged, SMALL).skipped
    assert (damaged / "validation/chunk2/example_holdout_0.jsonl.zst").read_bytes() == (
        out / "validation/chunk2/example_holdout_0.jsonl.zst"
    ).read_bytes()


def test_refuses_folders_it_did_not_write(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SampleError, match="not written by the sample builder"):
        build_sample(foreign, SMALL)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "manifest.json").write_text(json.dumps({"format": "x", "source": {"kind": "hub"}}))
    with pytest.raises(SampleError, match="did not write"):
        build_sample(downloaded, SMALL)


@pytest.mark.parametrize(
    "field,value",
    [("megabytes", 0), ("train_chunks", 0), ("validation_files_per_chunk", 1.5), ("validation_every", 1)],
)
def test_invalid_spec(field, value):
    with pytest.raises(SampleError, match=f"sample.{field}"):
        SampleSpec(**{field: value})


def test_cli(built, tmp_path):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    out, _ = built
    args = ["--train-chunks", "2", "--train-files-per-chunk", "3", "--validation-chunks", "2",
            "--validation-files-per-chunk", "1", "--megabytes", "0.4"]
    result = CliRunner().invoke(app, ["data", "sample", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    result = CliRunner().invoke(app, ["data", "sample", "--out", str(out), "--megabytes", "1"])
    assert result.exit_code == 1
    assert "error:" in result.output
