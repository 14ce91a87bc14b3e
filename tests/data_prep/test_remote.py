"""Shards on object storage (moto's S3 server): the loader streams shards through a bounded cache and reads
exactly what it reads from local disk, resumes included."""

from __future__ import annotations

import boto3
import numpy as np
import pytest

from data_prep.errors import ShardError
from data_prep.loader import PackedDataset
from data_prep.remote import RemoteDataset, ShardCache, upload_dataset
from data_prep.shards import read_manifest


@pytest.fixture(scope="module")
def remote_tokens(s3_bucket, local_tokens):
    uri = f"s3://{s3_bucket}/datasets/synthetic/train"
    sent = upload_dataset(local_tokens, uri)
    assert sent == sum(s.bytes for s in read_manifest(local_tokens).shards)
    assert upload_dataset(local_tokens, uri) == 0  # a re-run skips shards already there
    return uri


def _cache_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_remote_loader_reads_what_local_reads_with_a_bounded_cache(remote_tokens, local_tokens, tmp_path):
    shard_bytes = max(s.bytes for s in read_manifest(local_tokens).shards)
    budget = int(2.5 * shard_bytes)  # about two of the ~9 shards fit
    local = PackedDataset(local_tokens, ctx_len=32, seed=7)
    remote = PackedDataset(remote_tokens, ctx_len=32, seed=7, cache_dir=tmp_path, cache_bytes=budget,
                           max_open_shards=1)
    assert len(remote) == len(local) and remote.manifest.digest == local.manifest.digest
    cache = remote._remote.cache
    most_files = 0
    for start in range(len(local) - 400, len(local) + 400, 53):  # across an epoch boundary, shuffled order
        positions = np.arange(start, start + 4)
        got, want = remote.batch(positions), local.batch(positions)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert cache.size() <= budget
        most_files = max(most_files, len(_cache_files(cache.root)))
    assert 1 <= most_files < len(local.manifest.shards)  # shards were evicted, never all cached
    assert not [p for p in cache.root.rglob("*") if ".part-" in p.name]  # no partial download left behind


def test_resume_from_the_store_continues_the_same_order(remote_tokens, local_tokens, tmp_path):
    straight = PackedDataset(local_tokens, ctx_len=32, seed=3).iter_batches(4, rank=1, world_size=2)
    want = [next(straight) for _ in range(6)]
    # A fresh process (new cache) resuming after 3 steps of 4 x 2 samples reads steps 3..5 exactly.
    resumed = PackedDataset(remote_tokens, ctx_len=32, seed=3, cache_dir=tmp_path)
    got = resumed.iter_batches(4, rank=1, world_size=2, consumed=3 * 4 * 2)
    for step in range(3, 6):
        tokens, ids = next(got)
        np.testing.assert_array_equal(ids, want[step][1])
        np.testing.assert_array_equal(tokens, want[step][0])


def test_a_corrupt_remote_shard_is_refused_and_never_cached(s3_bucket, s3_server, local_tokens, tmp_path):
    uri = f"s3://{s3_bucket}/datasets/corrupt/train"
    upload_dataset(local_tokens, uri)
    info = read_manifest(local_tokens).shards[0]
    key = f"datasets/corrupt/train/{info.path}"
    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"])
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[-100] ^= 0xFF  # same size, different bytes
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    remote = RemoteDataset(uri, cache_dir=tmp_path)
    with pytest.raises(ShardError, match=rf"{info.path}: fetched .* sha256"):
        remote.shard_path(info)
    assert _cache_files(remote.local_root) == []
    s3.delete_object(Bucket=s3_bucket, Key=key)
    with pytest.raises(ShardError, match="missing from the store"):
        remote.shard_path(info)
    with pytest.raises(ShardError, match="no dataset manifest"):
        RemoteDataset(f"s3://{s3_bucket}/datasets/nothing-here", cache_dir=tmp_path)


def test_cache_evicts_least_recently_used_first(tmp_path):
    import os

    cache = ShardCache(tmp_path, max_bytes=250)
    for i, name in enumerate("abc"):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 + i, 1000 + i))
    os.utime(tmp_path / "a", (2000, 2000))  # "a" was used last: "b" is now the oldest
    assert cache.evict() == [tmp_path / "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]
