"""Shard writer/reader and manifest: counts match contents, atomicity, byte-identical rewrites, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.errors import ShardError, TokenizerMismatchError
from data_prep.shards import (
    MANIFEST_NAME,
    ShardWriter,
    open_shard,
    read_manifest,
    verify_dataset,
    write_manifest,
    write_token_dataset,
)


def _docs(n: int, seed: int = 0, max_len: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 65530, rng.integers(0, max_len)), 0).astype(np.uint16) for _ in range(n)]


def test_roundtrip_counts_and_zero_copy(tmp_path):
    docs = _docs(300)
    write_token_dataset(tmp_path, docs, "fp-a", source="RedPajamaC4", shard_tokens=5000)
    manifest = verify_dataset(tmp_path, "fp-a")
    flat = np.concatenate(docs)
    assert manifest.documents == len(docs) and manifest.tokens == flat.size
    assert manifest.by_source == {"RedPajamaC4": {"documents": len(docs), "tokens": flat.size}}
    # A shard is cut at the first document end at or past 5000 tokens; documents are never split.
    assert all(5000 <= s.tokens < 5000 + 201 for s in manifest.shards[:-1]) and len(manifest.shards) > 2
    arrays = [open_shard(tmp_path / s.path, "fp-a").arrays for s in manifest.shards]
    assert all(len(a) == 1 and not a[0].flags.writeable for a in arrays)
    np.testing.assert_array_equal(np.concatenate([a[0] for a in arrays]), flat)
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk["totals"]["tokens"] == flat.size and on_disk["version"] == 1


def test_one_batch_per_source_sorted(tmp_path):
    docs = _docs(40, seed=1)
    with ShardWriter(tmp_path, "mixed/part", "fp", shard_tokens=10**9, source_files=["a.jsonl.zst"]) as w:
        for i, doc in enumerate(docs):
            w.add(doc, "RedPajamaGithub" if i % 3 else "RedPajamaArXiv")
    (info,) = w.commit()
    shard = open_shard(tmp_path / info.path)
    assert [s.source for s in info.segments] == ["RedPajamaArXiv", "RedPajamaGithub"]
    np.testing.assert_array_equal(shard.arrays[0], np.concatenate(docs[0::3]))
    assert shard.meta["source_files"] == ["a.jsonl.zst"] and shard.meta["tokenizer"] == "fp"


def test_rewrite_is_byte_identical(tmp_path):
    docs = _docs(100, seed=2)
    write_token_dataset(tmp_path / "a", docs, "fp", shard_tokens=3000)
    write_token_dataset(tmp_path / "b", docs, "fp", shard_tokens=3000)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_failed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "part", "fp", shard_tokens=100) as w:
            for doc in _docs(50, seed=3):
                w.add(doc, "s")
            raise RuntimeError("input broke midway")
    assert list(tmp_path.rglob("*")) == []


def test_rejects_malformed_documents(tmp_path):
    with ShardWriter(tmp_path, "part", "fp") as w:
        with pytest.raises(ShardError, match="end-of-document"):
            w.add(np.array([5, 6], dtype=np.uint16), "s")
        with pytest.raises(ShardError, match="end-of-document"):
            w.add(np.array([5, 0, 6, 0], dtype=np.uint16), "s")
        with pytest.raises(ShardError, match="uint16"):
            w.add(np.array([70000, 0]), "s")


def test_verify_catches_tampering_and_foreign_tokenizer(tmp_path):
    write_token_dataset(tmp_path, _docs(50, seed=4), "fp", shard_tokens=2000)
    manifest = read_manifest(tmp_path)
    with pytest.raises(TokenizerMismatchError, match="manifest.json"):
        verify_dataset(tmp_path, "other-fp")
    shard = tmp_path / manifest.shards[0].path
    with pytest.raises(TokenizerMismatchError, match=shard.name):
        open_shard(shard, "other-fp")
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name):
        verify_dataset(tmp_path)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ShardError, match="no dataset manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="unreadable"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, "fp", [])
    obj = json.loads((tmp_path / MANIFEST_NAME).read_text())
    obj["shards"] = [{"path": "../x.arrow", "sha256": "0", "bytes": 1, "segments": []}]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(obj))
    with pytest.raises(ShardError, match="escapes"):
        read_manifest(tmp_path)
