"""The tokenize stage: ids equal the reference tokenizer's, counts, resume after a stop or a kill with
byte-identical shards, bad input accounting and quarantine, the error budget, and the CLI."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.errors import ErrorBudgetExceeded, SourceError
from data_prep.jsonl import Document, iter_documents
from data_prep.loader import PackedDataset
from data_prep.shards import open_shard, read_manifest, verify_dataset
from data_prep.tokenize import TokenizeConfig, tokenize
from data_prep.tokenizer import load_tokenizer

SOURCES = ["RedPajamaArXiv", "RedPajamaBook", "RedPajamaC4", "RedPajamaGithub", "RedPajamaWikipedia"]
EXTRA = ["Grüße aus Köln — naïve café", "日本語のテキストと中文混合。", "emoji 🙂🚀 and tabs\t\tend", "  x = [1, 2]\n" * 5]


def _texts() -> list[str]:
    """Prose and code from the standard library (offline, deterministic per Python version) plus non-ASCII."""
    import collections
    import json as json_mod
    import textwrap as textwrap_mod

    texts = []
    for mod in (collections, json_mod, textwrap_mod):
        texts += [inspect.getsource(obj) for _, obj in inspect.getmembers(mod, inspect.isfunction)][:40]
    return [t for t in texts if t] + EXTRA * 3


def _write(path: Path, lines: list[bytes], frames: int = 2) -> None:
    body = b"\n".join(lines) + b"\n"
    cut = len(body) // frames
    parts = [body[i * cut : (i + 1) * cut if i < frames - 1 else len(body)] for i in range(frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))


def _line(text: str, source: str) -> bytes:
    return json.dumps({"text": text, "meta": {"redpajama_set_name": source}}).encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    texts = _texts()
    layout = [("train", 1, 0), ("train", 1, 1), ("train", 2, 2), ("train", 2, 3), ("validation", 1, 0)]
    for n, (split, chunk, i) in enumerate(layout):
        name = "example_train" if split == "train" else "example_holdout"
        lines = [_line(t, SOURCES[(n + j) % len(SOURCES)]) for j, t in enumerate(texts[n::3])]
        _write(root / split / f"chunk{chunk}" / f"{name}_{i}.jsonl.zst", lines)
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    """Shards and manifests (records hold timings, so they are left out)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and (p.suffix == ".arrow" or p.name == "manifest.json")
    }


@pytest.fixture(scope="module")
def clean_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    summary = tokenize(corpus, out, TokenizeConfig(workers=1, shard_tokens=1000, progress=False))
    return out, summary


def test_ids_equal_reference_tokenizer(corpus, clean_run):
    out, summary = clean_run
    reference = load_tokenizer(impl="reference")
    assert summary.files == 5 and summary.processed == 5 and set(summary.manifests) == {"train", "validation"}
    for split in ("train", "validation"):
        manifest = verify_dataset(out / split, reference.fingerprint)  # sha256, counts recounted from ids
        expected: dict[str, list[int]] = {}
        for path in sorted((corpus / split).rglob("*.jsonl.zst")):
            for doc in iter_documents(path):
                expected.setdefault(doc.source, []).extend(reference.encode(doc.text) + [0])
        got: dict[str, list[np.ndarray]] = {}
        for info in manifest.shards:
            shard = open_shard(out / split / info.path)
            for seg, arr in zip(info.segments, shard.arrays):
                got.setdefault(seg.source, []).append(arr)
        assert sorted(got) == sorted(expected)
        for source, ids in expected.items():
            np.testing.assert_array_equal(np.concatenate(got[source]), np.array(ids, dtype=np.uint16))
        assert manifest.by_source == {s: {"documents": ids.count(0), "tokens": len(ids)} for s, ids in expected.items()}
    train = read_manifest(out / "train")
    assert summary.tokens == train.tokens + read_manifest(out / "validation").tokens
    assert len(train.shards) > 6  # several shards per input at shard_tokens=1000
    for rel in {s.source_files for s in train.shards}:
        sizes = [s.tokens for s in train.shards if s.source_files == rel]
        assert min(sizes[:-1], default=1000) >= 1000  # cut at the first document end past the target
    assert len(PackedDataset(out / "train", 64, expected_tokenizer=reference.fingerprint)) == sum(
        (c["tokens"] - 1) // 64 for c in train.by_source.values()
    )


def test_spawned_workers_write_identical_bytes(corpus, clean_run, tmp_path):
    summary = tokenize(corpus, tmp_path, TokenizeConfig(workers=2, shard_tokens=1000, progress=False))
    assert summary.workers == 2 and summary.processed == 5
    assert _outputs(tmp_path) == _outputs(clean_run[0])


def test_clean_run_uses_the_native_tokenizer_by_default(corpus):
    from data_prep.tokenize import plan_tasks

    tasks = plan_tasks(corpus, corpus.parent / "unused", TokenizeConfig())
    assert {t.tokenizer_impl for t in tasks} == {"native"}


@pytest.mark.parametrize("batch_chars", [1 << 20, 700])
def test_native_and_fast_tokenizers_write_identical_bytes(batch_chars, monkeypatch, tmp_path):
    # The native tokenizer encodes batches of documents in one call (`encode_flat`); the Rust one goes through
    # the base class, one document at a time. Small batches put batch ends between every few documents, next to
    # bad lines, unencodable documents and the damage of a truncated file.
    import data_prep.tokenize as stage

    monkeypatch.setattr(stage, "BATCH_CHARS", batch_chars)
    src = tmp_path / "src"
    texts = _texts()
    lines = []
    for i, text in enumerate(texts):
        lines.append(_line(text, SOURCES[i % len(SOURCES)]))
        if i % 9 == 4:
            lines.append(b'{"text": "lone \\ud800 surrogate", "meta": {"redpajama_set_name": "RedPajamaC4"}}')
        if i % 13 == 6:
            lines.append(b'{"text": "broken')
    _write(src / "train" / "chunk1" / "mixed.jsonl.zst", lines, frames=3)
    truncated = src / "train" / "chunk1" / "truncated.jsonl.zst"
    _write(truncated, lines * 2)
    truncated.write_bytes(truncated.read_bytes()[:-50])
    outputs = {}
    for impl in ("fast", "native"):
        out = tmp_path / impl
        summary = tokenize(src, out, TokenizeConfig(workers=1, shard_tokens=700, progress=False, tokenizer_impl=impl,
                                                    max_bad_line_fraction=1.0, max_quarantined_fraction=1.0))
        records = {p.relative_to(out).as_posix(): json.loads(p.read_text())
                   for p in sorted(out.rglob("_*/**/*.json"))}
        for record in records.values():
            record.pop("seconds")
        outputs[impl] = (_outputs(out), records, summary)
    (fast_files, fast_records, fast), (native_files, native_records, native) = outputs["fast"], outputs["native"]
    assert native_files == fast_files and native_records == fast_records
    assert len(native_records) == 2 and list(native.quarantined) == ["train/chunk1/truncated.jsonl.zst"]
    quarantined = native_records["train/_quarantine/chunk1/truncated.json"]
    assert quarantined["bad_lines"]["unencodable"] > len(texts) // 9 and quarantined["text_bytes"] > 0
    assert native.bad_lines == fast.bad_lines and native.bad_lines["unencodable"] > 0
    assert (native.documents, native.tokens, native.text_bytes) == (fast.documents, fast.tokens, fast.text_bytes)


def test_resume_after_stop_is_byte_identical(corpus, clean_run, tmp_path):
    config = TokenizeConfig(workers=1, shard_tokens=1000, progress=False, max_files=2)
    first = tokenize(corpus, tmp_path, config)
    assert first.processed == 2 and first.pending == 3 and not first.manifests
    assert not list(tmp_path.rglob("manifest.json"))  # no manifest while inputs are pending
    rest = tokenize(corpus, tmp_path, TokenizeConfig(workers=1, shard_tokens=1000, progress=False))
    assert (rest.skipped, rest.processed, rest.pending) == (2, 3, 0)
    assert _outputs(tmp_path) == _outputs(clean_run[0])
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = tokenize(corpus, tmp_path, TokenizeConfig(workers=1, shard_tokens=1000, progress=False))
    assert again.processed == 0 and again.tokens == rest.tokens
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes  # nothing rewritten


def test_killed_run_completes_byte_identical(corpus, clean_run, tmp_path):
    # After its first file the run waits before each next one, so it is killed mid-run on a machine of any speed.
    script = textwrap.dedent(f"""
        import time
        import data_prep.tokenize as stage
        original, started = stage.tokenize_file, []
        def paced(task):
            if started:
                time.sleep(60)
            started.append(task)
            return original(task)
        stage.tokenize_file = paced
        stage.tokenize({str(corpus)!r}, {str(tmp_path)!r},
                       stage.TokenizeConfig(workers=1, shard_tokens=1000, progress=False))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("_done/**/*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(tmp_path.rglob("_done/**/*.json")))
    assert 1 <= done_at_kill < 5, "the run finished before it could be killed"
    assert not list(tmp_path.rglob("manifest.json"))
    summary = tokenize(corpus, tmp_path, TokenizeConfig(workers=1, shard_tokens=1000, progress=False))
    assert summary.skipped == done_at_kill and summary.processed == 5 - done_at_kill
    assert _outputs(tmp_path) == _outputs(clean_run[0])
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_bad_input_counted_and_quarantined(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    good = [_line(f"good document {i} " * 20, SOURCES[i % 2]) for i in range(40)]
    bad = good[:5] + [
        b'{"text": "broken',  # line 6
        json.dumps({"meta": {"redpajama_set_name": "RedPajamaC4"}}).encode(),  # 7
        _line("", "RedPajamaC4"),  # 8
        b'{"text": "lone \\udc00 surrogate", "meta": {"redpajama_set_name": "RedPajamaC4"}}',  # 9
        b'{"text": "broken again"',  # 10
    ] + good[5:]
    _write(src / "train" / "chunk1" / "a.jsonl.zst", good)
    _write(src / "train" / "chunk1" / "b.jsonl.zst", bad)
    _write(src / "train" / "chunk1" / "c.jsonl.zst", good)
    truncated = src / "train" / "chunk2" / "d.jsonl.zst"
    _write(truncated, good * 3)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    loose = TokenizeConfig(workers=1, shard_tokens=500, progress=False, max_bad_line_fraction=0.1,
                           max_quarantined_fraction=0.25)

    summary = tokenize(src, out, loose)
    assert summary.bad_lines == {"invalid_json": 2, "missing_text": 1, "empty": 1, "unencodable": 1}
    assert summary.bad_files == {
        "train/chunk1/b.jsonl.zst": {"invalid_json": [6, 10], "missing_text": [7], "empty": [8], "unencodable": [9]}
    }
    assert list(summary.quarantined) == ["train/chunk2/d.jsonl.zst"] and "truncated" in summary.quarantined[
        "train/chunk2/d.jsonl.zst"]
    assert not list((out / "train" / "chunk2").glob("*")), "a quarantined input left shard files"
    assert (out / "train" / "_quarantine" / "chunk2" / "d.jsonl.zst".replace(".jsonl.zst", ".json")).is_file()
    manifest = verify_dataset(out / "train")
    assert manifest.documents == 3 * 40 and {s.source_files for s in manifest.shards} == {
        ("train/chunk1/a.jsonl.zst",), ("train/chunk1/b.jsonl.zst",), ("train/chunk1/c.jsonl.zst",)}
    assert manifest.extra["bad_lines"]["invalid_json"] == 2

    # A strict budget fails the stage and writes no manifest; the error carries the summary.
    strict = TokenizeConfig(workers=1, shard_tokens=500, progress=False, max_quarantined_fraction=0.25)
    with pytest.raises(ErrorBudgetExceeded, match="bad lines") as info:
        tokenize(src, tmp_path / "strict", strict)
    assert info.value.summary.bad_lines["invalid_json"] == 2
    assert not (tmp_path / "strict" / "train" / "manifest.json").exists()
    with pytest.raises(ErrorBudgetExceeded, match="quarantined"):
        tokenize(src, tmp_path / "strict", TokenizeConfig(workers=1, progress=False, max_bad_line_fraction=0.1))

    # A re-downloaded (repaired) input leaves quarantine on the next run; finished files are skipped.
    _write(truncated, good * 3)
    repaired = tokenize(src, out, loose)
    assert repaired.processed == 1 and not repaired.quarantined and repaired.documents == 4 * 40 + 120 - 40


@pytest.mark.parametrize("first, second", [("train/x", "x"), ("other/c/x", "train/other/c/x")],
                         ids=["top-level", "nested"])
def test_inputs_sharing_a_shard_name_are_refused_before_work(first, second, tmp_path):
    # Outside a split folder a file counts as `train`, so both inputs map to one shard prefix (issue 18, bug 2).
    src, out = tmp_path / "src", tmp_path / "out"
    for rel in (first, second):
        _write(src / f"{rel}.jsonl.zst", [_line(f"document of {rel} " * 20, SOURCES[0])])
    with pytest.raises(SourceError, match=rf"'{first}\.jsonl\.zst' and '{second}\.jsonl\.zst'"):
        tokenize(src, out, TokenizeConfig(workers=1, progress=False))
    assert not out.exists() or not any(out.rglob("*.arrow")), "work started before the clash was refused"


def test_manifest_refuses_a_shard_listed_twice(corpus, clean_run, tmp_path):
    from data_prep.errors import ShardError
    from data_prep.shards import write_manifest

    manifest = read_manifest(clean_run[0] / "train")
    with pytest.raises(ShardError, match="listed twice"):
        write_manifest(tmp_path, manifest.tokenizer, [manifest.shards[0], manifest.shards[0]])
    assert not (tmp_path / "manifest.json").exists()


def test_cli(corpus, tmp_path):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "tokenize", "--src", str(corpus / "validation"), "--out", str(tmp_path),
                                 "--workers", "1", "--no-progress", "--summary-json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "manifests: train=" in result.output
    assert json.loads((tmp_path / "s.json").read_text())["processed"] == 1
    result = runner.invoke(app, ["data", "tokenize", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "error:" in result.output and "nope" in result.output
