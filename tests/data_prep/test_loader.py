"""Packed loader: exact epoch coverage across ranks, resume, packing, refusals, mixture, validation order."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from data_prep.errors import ShardError, TokenizerMismatchError
from data_prep.loader import FeistelPermutation, PackedDataset, rank_positions, validation_dataset
from data_prep.shards import ShardWriter, read_manifest, write_manifest, write_token_dataset

CTX = 16


def _docs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 65530, rng.integers(0, 60)), 0).astype(np.uint16) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    docs = _docs(400)
    write_token_dataset(root, docs, "fp", shard_tokens=997)  # many shards: windows cross shard ends
    return root, np.concatenate(docs)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, b"key")
    assert sorted(perm(np.arange(n)).tolist()) == list(range(n))
    assert perm(np.arange(n)).tolist() != FeistelPermutation(n, b"other")(np.arange(n)).tolist() or n < 4


def test_windows_pack_without_padding(dataset):
    root, flat = dataset
    ds = PackedDataset(root, CTX)
    assert len(ds) == (flat.size - 1) // CTX
    for sid in range(len(ds)):
        np.testing.assert_array_equal(ds.window(sid), flat[sid * CTX : sid * CTX + CTX + 1])
    inside = [sid for sid in range(len(ds)) if np.shares_memory(ds.window(sid), ds.window(sid))]
    assert len(inside) > len(ds) * 0.8  # zero-copy views except windows that cross a shard end


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_across_ranks(dataset, world_size):
    root, _ = dataset
    ds = PackedDataset(root, CTX, seed=7)
    batch = 5
    seen = []
    for consumed in range(0, len(ds), batch * world_size):
        for rank in range(world_size):
            pos = rank_positions(consumed, batch, rank, world_size)
            tokens, ids = ds.batch(pos[pos < len(ds)])
            assert tokens.shape == (ids.size, CTX + 1) and tokens.dtype == np.uint16
            seen.extend(ids.tolist())
    assert sorted(seen) == list(range(len(ds)))
    assert seen != sorted(seen)


def test_resume_matches_uninterrupted_run_any_world_size(dataset):
    root, _ = dataset
    ds = PackedDataset(root, CTX, seed=3)
    gb = 12
    steps = 2 * len(ds) // gb + 3  # crosses two epoch boundaries
    straight = np.concatenate([ds.batch(rank_positions(s * gb, gb))[1] for s in range(steps)])
    resumed = [ds.batch(rank_positions(s * gb, gb))[1] for s in range(20)]
    fresh = PackedDataset(root, CTX, seed=3)  # a new process after a restart: only the counter survives
    for s in range(20, steps):
        resumed.append(np.concatenate([fresh.batch(rank_positions(s * gb, 4, r, 3))[1] for r in range(3)]))
    np.testing.assert_array_equal(np.concatenate(resumed), straight)
    epoch0, epoch1 = straight[: len(ds)], straight[len(ds) : 2 * len(ds)]
    assert sorted(epoch1.tolist()) == list(range(len(ds))) and epoch0.tolist() != epoch1.tolist()
    assert PackedDataset(root, CTX, seed=4).sample_ids(range(50)).tolist() != straight[:50].tolist()


def test_refuses_foreign_tokenizer(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(TokenizerMismatchError, match="manifest.json"):
        PackedDataset(root, CTX, expected_tokenizer="another-tokenizer")
    with ShardWriter(tmp_path, "part", "another-tokenizer") as w:  # a shard smuggled under a manifest saying "fp"
        for doc in _docs(50, seed=1):
            w.add(doc, "synthetic")
    write_manifest(tmp_path, "fp", w.commit())
    ds = PackedDataset(tmp_path, CTX, expected_tokenizer="fp")
    with pytest.raises(TokenizerMismatchError, match="part-00000.arrow"):
        ds[0]


def test_reads_only_listed_shards(dataset, tmp_path):
    root, _ = dataset
    docs = _docs(30, seed=2)
    write_token_dataset(tmp_path, docs, "fp")
    listed = read_manifest(tmp_path)
    write_token_dataset(tmp_path / "stray", _docs(30, seed=5), "other")
    (tmp_path / "stray" / "part-00000.arrow").rename(tmp_path / "zz-00000.arrow")
    ds = PackedDataset(tmp_path, CTX)
    assert len(ds) == (listed.tokens - 1) // CTX
    np.testing.assert_array_equal(ds.window(0), np.concatenate(docs)[: CTX + 1])
    (tmp_path / listed.shards[0].path).unlink()
    with pytest.raises(ShardError, match="missing"):
        PackedDataset(tmp_path, CTX)[0]


def test_mixture_weights(tmp_path):
    with ShardWriter(tmp_path, "p", "fp", shard_tokens=700) as w:
        for i, doc in enumerate(_docs(600, seed=6)):
            w.add(doc, ["A", "B", "C"][i % 3])
    write_manifest(tmp_path, "fp", w.commit())
    natural = PackedDataset(tmp_path, CTX)
    ds = PackedDataset(tmp_path, CTX, mixture={"A": 3.0, "B": 1.0})
    assert len(ds) == len(natural)
    ids = ds.sample_ids(np.arange(3 * len(ds)))
    counts = Counter(ds.source_of(i) for i in ids)
    assert counts["C"] == 0
    assert counts["A"] == pytest.approx(3 * len(ds) * 0.75, abs=3)
    a_ids = [i for i in ids[: len(ds)] if ds.source_of(i) == "A"]
    assert Counter(Counter(a_ids).values()).keys() <= {2, 3}  # A upsampled ~2.2x: each window 2 or 3 times an epoch
    with pytest.raises(ShardError, match="unknown sources"):
        PackedDataset(tmp_path, CTX, mixture={"D": 1.0})


def test_validation_is_sequential_and_pickles(dataset):
    root, flat = dataset
    ds = validation_dataset(root, CTX, expected_tokenizer="fp")
    tokens, ids = ds.batch(range(len(ds)))
    assert ids.tolist() == list(range(len(ds)))
    np.testing.assert_array_equal(tokens[:, :-1].reshape(-1), flat[: len(ds) * CTX])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.batch(range(5))[0], tokens[:5])


def test_empty_dataset_is_refused(tmp_path):
    write_token_dataset(tmp_path, [np.array([5, 0], dtype=np.uint16)], "fp")
    with pytest.raises(ShardError, match="no window"):
        PackedDataset(tmp_path, CTX)
