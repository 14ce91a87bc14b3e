"""The RWKV World tokenizer: the fast (Rust) implementation against our pure-Python reference."""

from __future__ import annotations

import ast
import json
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import TokenizationError, TokenizerError
from data_prep.tokenizer import DEFAULT_VOCAB_PATH, VOCAB_SIZE, load_tokenizer, read_vocab

REFERENCE_TEXTS = (  # public texts in the repository (origins: tests/data/README.md, rwkv5/eval/assets/README.md)
    (Path(__file__).resolve().parents[1] / "data" / "rwkv-lm-demo.jsonl", 1),
    (Path(__file__).resolve().parents[2] / "rwkv5" / "eval" / "assets" / "lambada_test.jsonl", 10),
)

VARIED_TEXTS = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. It wasn't me, said the fox!",
    "code": "def f(x: int) -> int:\n    return {'a': [x ** 2 for x in range(10)]}\t# comment\r\n",
    "cjk": "中文分词测试：你好，世界。日本語のテキストです。한국어 문장입니다.",
    "emoji": "🎉👍🏽👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵 and ☕",
    "mixed_scripts": "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย, and English in one line.",
    "whitespace_runs": " " * 300 + "\n" * 70 + "\t" * 130 + "x" + " \n" * 50,
    "control_chars": "".join(chr(c) for c in range(32)) + "\x7f\x80\x9f\u200b\ufeff",
    "long_word": "a" * 1000 + "b" * 257,
    "numbers": "3.14159265358979 1,234,567.89 0xDEADBEEF 1e-10 2023-04-24T12:00:00Z",
    "rare_chars": "\U0001d54f\U0001f9ec\u0fff\uffff\U0010ffff",
}


def _vocab_entries(path: Path) -> dict[bytes, int]:
    """The vocabulary as {bytes: id}, parsed here independently of data_prep.tokenizer."""
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        token_id, rest = line.split(" ", 1)
        literal, _length = rest.rsplit(" ", 1)
        value = ast.literal_eval(literal)
        entries[value.encode("utf-8") if isinstance(value, str) else value] = int(token_id)
    return entries


@pytest.mark.parametrize("name", list(VARIED_TEXTS), ids=list(VARIED_TEXTS))
def test_fast_matches_reference(name, reference, fast):
    text = VARIED_TEXTS[name]
    ids = reference.encode(text)
    assert fast.encode(text) == ids
    assert all(1 <= i < VOCAB_SIZE for i in ids)
    assert reference.decode(ids) == text
    assert fast.decode(ids) == text


def test_fast_matches_reference_on_random_text(reference, fast):
    rng = random.Random(0)
    entries = [t for t in read_vocab(DEFAULT_VOCAB_PATH).tokens[1:] if _is_utf8(t)]
    # Concatenated vocabulary entries put entry boundaries everywhere greedy matching could go wrong.
    glued = b"".join(rng.choice(entries) for _ in range(3000)).decode("utf-8")
    planes = [(0x20, 0x7F), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xFFFD),
              (0x1F300, 0x1FAFF)]
    scattered = "".join(chr(rng.randrange(*rng.choice(planes))) for _ in range(5000))
    for text in (glued, scattered):
        ids = reference.encode(text)
        assert fast.encode(text) == ids
        assert fast.decode(ids) == text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_batch_matches_single(reference, fast):
    texts = list(VARIED_TEXTS.values())
    expected = [reference.encode(t) for t in texts]
    assert fast.encode_batch(texts) == expected
    assert reference.encode_batch(texts) == expected


def test_fast_matches_reference_on_reference_texts(reference, fast):
    texts = []
    for path, stride in REFERENCE_TEXTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        texts += [json.loads(line)["text"] for line in lines[::stride]]
    fast_ids = fast.encode_batch(texts)
    for text, ids in zip(texts, fast_ids):
        assert ids == reference.encode(text), text[:80]
        assert fast.decode(ids) == text


def test_known_sentence_gives_the_vocab_ids(reference, fast):
    entries = _vocab_entries(DEFAULT_VOCAB_PATH)
    pieces = ["Hello", " world", ",", " the", " tokenizer", " works", "."]
    text = "".join(pieces)
    expected = [entries[p.encode()] for p in pieces]
    # Greedy longest match: no vocabulary entry longer than the piece starts where the piece starts.
    data, pos = text.encode(), 0
    for piece in pieces:
        rest = data[pos:]
        assert not any(rest[:n] in entries for n in range(len(piece.encode()) + 1, len(rest) + 1)), piece
        pos += len(piece.encode())
    assert reference.encode(text) == expected
    assert fast.encode(text) == expected


def test_single_bytes_are_ids_1_to_256(reference):
    # Bytes that never occur in UTF-8 text, so the only way to get them is decoding their ids.
    for byte in (0x00, 0x41, 0xC0, 0xF5, 0xFF):
        assert reference.decode_bytes([byte + 1]) == bytes([byte])


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("text,position", [("\ud800", 0), ("ok \udfff then", 3), ("a\U0001f600\ud83d", 2)])
def test_lone_surrogate_raises_typed_error(impl, text, position, reference, fast):
    tok = fast if impl == "fast" else reference
    with pytest.raises(TokenizationError) as info:
        tok.encode(text)
    assert info.value.position == position
    assert isinstance(info.value, ValueError)
    with pytest.raises(TokenizationError) as info:
        tok.encode_batch(["fine", text])
    assert (info.value.index, info.value.position) == (1, position)


def test_decode_of_partial_utf8_does_not_crash(reference, fast):
    text = "🎉中"
    ids = fast.encode(text)
    pieces = [fast.decode([i]) for i in ids]
    assert len(ids) > 2 and any("\ufffd" in p for p in pieces)
    assert b"".join(fast.decode_bytes([i]) for i in ids) == text.encode()
    assert fast.decode(ids) == reference.decode(ids) == text
    # Lone continuation and lead bytes, by their single-byte ids.
    assert fast.decode([0x80 + 1, 0xE4 + 1]) == "\ufffd\ufffd"


def test_decode_special_and_bad_ids(fast):
    hello = fast.encode("Hello")
    assert fast.decode([0] + hello + [VOCAB_SIZE - 1, 0]) == "Hello"
    assert fast.decode(np.array(hello, dtype=np.uint16)) == "Hello"
    for bad in (VOCAB_SIZE, -1, 2**40):
        with pytest.raises(TokenizationError) as info:
            fast.decode(hello + [bad])
        assert info.value.position == len(hello)


def test_identity(reference, fast, tmp_path):
    assert fast.vocab_size == reference.vocab_size == 65536
    assert fast.eod_id == reference.eod_id == 0
    assert fast.name == "rwkv_vocab_v20230424"
    assert fast.fingerprint == reference.fingerprint
    assert fast.fingerprint.startswith("rwkv_vocab_v20230424-sha256:")
    # The same entries with LF line endings (as inside the Rust wheels) are the same vocabulary.
    lf = tmp_path / "rwkv_vocab_v20230424.txt"
    lf.write_bytes(DEFAULT_VOCAB_PATH.read_bytes().replace(b"\r\n", b"\n"))
    assert read_vocab(lf).fingerprint == fast.fingerprint
    changed = tmp_path / "other" / "rwkv_vocab_v20230424.txt"
    changed.parent.mkdir()
    changed.write_bytes(lf.read_bytes().replace(b"'Hello'", b"'Hellp'"))
    assert read_vocab(changed).fingerprint != fast.fingerprint


def test_pickle_rebuilds_the_same_tokenizer(fast):
    clone = pickle.loads(pickle.dumps(fast))
    assert (clone.impl, clone.fingerprint) == ("fast", fast.fingerprint)
    assert clone.encode(VARIED_TEXTS["code"]) == fast.encode(VARIED_TEXTS["code"])


def test_bad_vocab_and_impl(tmp_path):
    with pytest.raises(TokenizerError, match="impl"):
        load_tokenizer(impl="sentencepiece")
    with pytest.raises(TokenizerError, match="missing.txt"):
        load_tokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 'a' 1\n2 'bc' 3\n")
    with pytest.raises(TokenizerError, match=r"bad.txt:2"):
        load_tokenizer(bad, impl="reference")


def test_forked_child_after_batch_does_not_hang(tmp_path):
    # The Rust thread pool does not survive fork; encode_batch must notice and avoid it in the child.
    script = textwrap.dedent(
        """
        import os
        from data_prep.tokenizer import load_tokenizer
        tok = load_tokenizer()
        parent = tok.encode_batch(["hello world"] * 64)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if tok.encode_batch(["hello world"] * 64) == parent else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
