"""The .jsonl.zst reader: every zstd frame, per-line classification, truncated and corrupt files."""

from __future__ import annotations

import json

import pytest
import zstandard

from data_prep.errors import InputReadError, TruncatedInputError
from data_prep.jsonl import BadLine, Document, iter_documents, iter_lines


def _frames(*chunks: bytes) -> bytes:
    return b"".join(zstandard.ZstdCompressor(level=3).compress(c) for c in chunks)


def _line(text, source="RedPajamaC4") -> bytes:
    return json.dumps({"text": text, "meta": {"redpajama_set_name": source}}).encode()


def test_reads_every_frame(tmp_path):
    lines = [_line(f"document {i} " * (i % 7 + 1)) for i in range(3000)]
    body = b"\n".join(lines) + b"\n"
    # Frame boundaries mid-line and a last line without newline must not matter.
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(_frames(body[:1000], body[1000:70000], body[70000:-1]))
    docs = list(iter_documents(path))
    assert [d.line for d in docs] == list(range(1, 3001))
    assert [d.text for d in docs] == [json.loads(x)["text"] for x in lines]
    assert zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read() != body  # only frame 1


def test_classifies_bad_lines(tmp_path):
    rows = [
        _line("fine"),
        b'{"text": "unterminated',
        b"",
        json.dumps({"meta": {}}).encode(),
        json.dumps({"text": 5}).encode(),
        b"[1, 2]",
        _line(""),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "no meta"}).encode(),
        _line("last, no newline", "RedPajamaBook"),
    ]
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(_frames(b"\n".join(rows)))
    items = list(iter_documents(path))
    kinds = {i.line: (i.kind if isinstance(i, BadLine) else i.source) for i in items}
    assert kinds == {
        1: "RedPajamaC4",
        2: "invalid_json",
        4: "missing_text",
        5: "missing_text",
        6: "missing_text",
        7: "empty",
        8: "unknown",
        9: "unknown",
        10: "RedPajamaBook",
    }
    surrogate = next(i for i in items if i.line == 8)
    assert isinstance(surrogate, Document) and "\ud800" in surrogate.text  # the tokenizer decides


def test_truncated_file_raises_after_good_lines(tmp_path):
    body = b"\n".join(_line(f"doc {i} " * 50) for i in range(400)) + b"\n"
    data = _frames(body[: len(body) // 2], body[len(body) // 2 :])
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[:-7])
    seen = []
    with pytest.raises(TruncatedInputError, match="cut.jsonl.zst"):
        for lineno, _ in iter_lines(path):
            seen.append(lineno)
    assert 200 <= len(seen) < 400


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "junk.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 50)
    with pytest.raises(InputReadError, match="junk.jsonl.zst"):
        list(iter_lines(path))
    with pytest.raises(InputReadError, match="cannot read"):
        list(iter_lines(tmp_path / "absent.jsonl.zst"))
