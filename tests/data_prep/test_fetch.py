"""`hf://` URLs name a repo, a revision and a file; other URLs are copied once; paths stay as they are."""

from __future__ import annotations

import fsspec
import pytest

from data_prep.errors import SourceError
from data_prep.fetch import HubFileRef, fetch_file, parse_hub_url


@pytest.mark.parametrize(
    "uri, ref",
    [
        ("hf://datasets/PygmalionAI/PIPPA/pippa_deduped.jsonl",
         HubFileRef("dataset", "PygmalionAI/PIPPA", "main", "pippa_deduped.jsonl")),
        ("hf://datasets/EleutherAI/lambada_openai@v1.0/data/lambada_test_en.jsonl",
         HubFileRef("dataset", "EleutherAI/lambada_openai", "v1.0", "data/lambada_test_en.jsonl")),
        ("hf://BlinkDL/rwkv-5-world/RWKV-5-World-0.4B.pth",
         HubFileRef("model", "BlinkDL/rwkv-5-world", "main", "RWKV-5-World-0.4B.pth")),
    ],
    ids=["dataset", "revision-and-folder", "model"],
)
def test_parse_hub_url(uri, ref):
    assert parse_hub_url(uri) == ref


@pytest.mark.parametrize("uri", ["hf://datasets/PygmalionAI/PIPPA", "hf://datasets/a//b.jsonl", "s3://b/k.jsonl"])
def test_a_url_that_names_no_hub_file_is_refused(uri):
    with pytest.raises(SourceError, match="not a Hub file URL"):
        parse_hub_url(uri)


def test_other_urls_are_copied_once_and_paths_kept(tmp_path):
    with fsspec.open("memory://bucket/chat.jsonl", "wb") as f:
        f.write(b'{"text": "User: a\\n\\nAssistant: b"}\n')
    copied = fetch_file("memory://bucket/chat.jsonl", tmp_path)
    assert copied == tmp_path / "chat.jsonl" and copied.read_bytes().startswith(b'{"text"')
    fsspec.filesystem("memory").rm("/bucket/chat.jsonl")
    assert fetch_file("memory://bucket/chat.jsonl", tmp_path) == copied  # cached: the source is not read again
    assert fetch_file(str(tmp_path / "x.jsonl"), tmp_path / "c") == tmp_path / "x.jsonl"
    assert fetch_file(f"file://{tmp_path}/x.jsonl", tmp_path / "c") == tmp_path / "x.jsonl"
