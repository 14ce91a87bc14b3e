"""The long-sample packer: sources in order, longest documents first, one end-of-document id between
documents, exact length, no sample across sources, held-out documents never in training."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import PackingError
from data_prep.long_samples import pack_long_samples, read_long_samples
from data_prep.shards import ShardWriter, write_manifest

# Document lengths (without the end-of-document id) per source, in the order they are written.
DOCS = {
    "RedPajamaArXiv": [25, 35],
    "RedPajamaBook": [20, 50, 30, 40],
    "RedPajamaCommonCrawl": [60],  # the longest document, but not of a long-document source
    "RedPajamaGithub": [45],
}
SOURCES = sorted(DOCS)


def _doc_id(source: str, index: int) -> int:
    """Every id of a document is this one value: a run of it in a sample names its document."""
    return 1 + 100 * SOURCES.index(source) + index


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("long-docs")
    # Small shards: documents of one source spread over several shards and record batches.
    with ShardWriter(out, "part", "test-ids", shard_tokens=80) as writer:
        for source in ("RedPajamaBook", "RedPajamaArXiv", "RedPajamaCommonCrawl", "RedPajamaGithub"):
            for index, length in enumerate(DOCS[source]):
                writer.add(np.append(np.full(length, _doc_id(source, index)), 0).astype(np.uint16), source)
    write_manifest(out, "test-ids", writer.commit())
    return out


def _stream(source: str, indices: list[int]) -> np.ndarray:
    return np.concatenate([np.append(np.full(DOCS[source][i], _doc_id(source, i)), 0) for i in indices])


def _documents(sample: np.ndarray) -> set[int]:
    return set(np.unique(sample[sample != 0]).tolist())


def test_samples_have_exact_length_and_come_from_the_longest_documents_books_first(dataset, tmp_path):
    packed = pack_long_samples(dataset, tmp_path, sample_len=31, train=5, heldout=1)
    train, heldout = read_long_samples(packed.train), read_long_samples(packed.heldout)

    assert train.shape == (5, 32) and heldout.shape == (1, 32) and train.dtype == np.uint16
    # Books by length: 50 (train), 40 (held out: every other document), 30, 20 (held-out set full: train);
    # 3 x 32 of the 103 training ids, the 7 left over dropped; then arXiv 35, 25: 1 x 32 of 62 ids; then GitHub.
    books = _stream("RedPajamaBook", [1, 2, 0])
    np.testing.assert_array_equal(train[:3], books[:96].reshape(3, 32))
    np.testing.assert_array_equal(train[3], _stream("RedPajamaArXiv", [1, 0])[:32])
    np.testing.assert_array_equal(train[4], _stream("RedPajamaGithub", [0])[:32])
    np.testing.assert_array_equal(heldout[0], _stream("RedPajamaBook", [3])[:32])
    assert packed.meta["train_sources"] == ["RedPajamaBook"] * 3 + ["RedPajamaArXiv", "RedPajamaGithub"]
    assert packed.meta["spec"]["sources"] == ["RedPajamaBook", "RedPajamaArXiv", "RedPajamaGithub",
                                              "RedPajamaCommonCrawl"]


def test_documents_are_separated_by_one_end_of_document_id_within_one_source(dataset, tmp_path):
    packed = pack_long_samples(dataset, tmp_path, sample_len=15, train=12, heldout=2)
    for name, sources in (("train", packed.meta["train_sources"]), ("heldout", packed.meta["heldout_sources"])):
        for sample, source in zip(read_long_samples(getattr(packed, name)), sources):
            assert len(sample) == 16
            runs = np.split(sample, np.flatnonzero(sample == 0) + 1)
            assert all(len(set(run[run != 0].tolist())) <= 1 for run in runs)  # a document, then its one 0
            assert not np.any((sample[:-1] == 0) & (sample[1:] == 0))  # no empty document, no padding
            assert {SOURCES[(doc - 1) // 100] for doc in _documents(sample)} == {source}


def test_held_out_samples_share_no_document_with_training(dataset, tmp_path):
    packed = pack_long_samples(dataset, tmp_path, sample_len=15, train=12, heldout=3)
    trained = set().union(*map(_documents, read_long_samples(packed.train)))
    held = set().union(*map(_documents, read_long_samples(packed.heldout)))
    assert held and trained and not held & trained
    assert packed.meta["documents"]["heldout"] >= 1


def test_packing_again_keeps_the_files_and_another_spec_repacks(dataset, tmp_path):
    packed = pack_long_samples(dataset, tmp_path, sample_len=31, train=2, heldout=1)
    seen = packed.train.stat().st_mtime_ns
    assert pack_long_samples(dataset, tmp_path, sample_len=31, train=2, heldout=1).meta == packed.meta
    assert packed.train.stat().st_mtime_ns == seen
    assert read_long_samples(pack_long_samples(dataset, tmp_path, sample_len=15, train=2, heldout=1).train).shape == (
        2, 16)


def test_too_few_tokens_is_an_error_naming_the_manifest(dataset, tmp_path):
    wanted = r"manifest\.json: .* 0 of 1 training and 0 of 2 held-out samples of 100 positions"
    with pytest.raises(PackingError, match=wanted):
        pack_long_samples(dataset, tmp_path, sample_len=100, train=1, heldout=2)
    with pytest.raises(PackingError, match="not in the dataset"):
        pack_long_samples(dataset, tmp_path, sample_len=8, train=1, heldout=1, sources=["RedPajamaC4"])
    assert not (tmp_path / "long_samples.json").exists()
