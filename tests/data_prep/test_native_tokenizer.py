"""The native (C extension) RWKV World tokenizer against our pure-Python reference, its batch API, its errors, and
the fallback to the Rust package when the extension is not built.

These tests need the extension: when it is missing they fail (the `native` fixture of conftest.py; build it with
`pip install -e . --no-deps`), except the fallback test, which hides it on purpose.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from data_prep import tokenizer as tokenizer_module
from data_prep.errors import TokenizationError, TokenizerError
from data_prep.jsonl import Document, iter_documents
from data_prep.sample import SampleSpec, build_sample
from data_prep.tokenizer import DEFAULT_VOCAB_PATH, EOD_ID, default_impl, load_tokenizer, read_vocab

TEXTS = {
    "empty": "",
    "ascii": "The quick brown fox jumps over the lazy dog. It wasn't me, said the fox!",
    "latin1_only": "Grüße aus Köln, naïve café, ½ × ¾ ÷ ¿¡ ÿ\xa0\xad",  # the 1-byte-kind, non-ASCII path
    "cjk": "中文分词测试：你好，世界。日本語のテキストです。한국어 문장입니다.",
    "emoji": "🎉👍🏽👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵 and ☕",
    "combining_marks": "e\u0301 a\u0308 n\u0303 \u0915\u093f \u0e01\u0e34 Z\u0351\u0352\u0353\u0354 \u1100\u1161\u11a8",
    "control_chars": "".join(chr(c) for c in range(32)) + "\x7f\x80\x9f\u200b\u200d\ufeff\u2028",
    "whitespace_runs": " " * 300 + "\n" * 70 + "\t" * 130 + "x" + " \n" * 50 + "\r\n" * 40,
    "longer_than_any_token": "a" * 1000 + "b" * 257 + "=" * 400 + "-" * 129 + "😀" * 100,
    "rare_chars": "\U0001d54f\U0001f9ec\u0fff\uffff\U0010ffff\U000e0001\ue000",
    "mixed_scripts": "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย, and English in one line.",
    "code": "def f(x: int) -> int:\n    return {'a': [x ** 2 for x in range(10)]}\t# comment\r\n",
}


def _utf8_entries() -> list[bytes]:
    entries = []
    for token in read_vocab(DEFAULT_VOCAB_PATH).tokens[1:]:
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        entries.append(token)
    return entries


def _assert_same(native, reference, text: str) -> None:
    ids = reference.encode(text)
    assert native.encode(text) == ids, text[:80]
    flat = native.encode_flat([text])
    np.testing.assert_array_equal(flat.ids, np.array(ids + [EOD_ID], dtype=np.uint16))


def test_native_is_the_default_when_built(native):
    assert default_impl() == "native"
    tok = load_tokenizer()
    assert tok.impl == "native" and type(tok).__name__ == "NativeTokenizer"


@pytest.mark.parametrize("name", list(TEXTS), ids=list(TEXTS))
def test_native_matches_reference(name, native, reference):
    text = TEXTS[name]
    _assert_same(native, reference, text)
    assert native.decode(native.encode(text)) == text


def test_native_matches_reference_on_the_sample_corpus(native, reference, tmp_path):
    # The offline sample (`rwkv5 data sample`): standard-library prose and code in SlimPajama's layout.
    build_sample(tmp_path / "sample", SampleSpec(megabytes=0.6, train_files_per_chunk=1,
                                                 validation_files_per_chunk=1))
    texts = [d.text for path in sorted((tmp_path / "sample").rglob("*.jsonl.zst"))
             for d in iter_documents(path) if isinstance(d, Document)]
    assert len(texts) > 100 and sum(map(len, texts)) > 400_000
    expected = [reference.encode(t) for t in texts]
    assert [native.encode(t) for t in texts] == expected
    flat = native.encode_flat(texts)
    assert flat.errors == []
    assert flat.text_bytes == sum(len(t.encode("utf-8")) for t in texts)
    np.testing.assert_array_equal(flat.ids, np.array([i for ids in expected for i in ids + [0]], np.uint16))


@pytest.mark.parametrize("seed", range(4))
def test_native_matches_reference_on_random_soups(seed, native, reference):
    rng = random.Random(seed)
    entries = _utf8_entries()
    everything = read_vocab(DEFAULT_VOCAB_PATH).tokens[1:]
    # Glued vocabulary entries put entry boundaries everywhere greedy matching could go wrong; cutting the
    # longest ones short makes the walk run into the end of the text or a near miss.
    glued = b"".join(rng.choice(entries) for _ in range(2000)).decode("utf-8")
    long_entries = sorted(entries, key=len)[-300:]
    near_misses = "".join(
        t.decode("utf-8", errors="ignore")[: rng.randrange(1, len(t) + 1)] + rng.choice(["", " ", "x", "\n"])
        for t in rng.sample(long_entries, 200)
    )
    # Random bytes (any entries, also the ones that are not UTF-8 on their own), read back as text.
    byte_soup = b"".join(rng.choice(everything) if rng.random() < 0.5 else bytes([rng.randrange(256)])
                         for _ in range(3000))
    planes = [(0x00, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    scattered = "".join(chr(rng.randrange(*rng.choice(planes))) for _ in range(3000))
    texts = [glued, near_misses, byte_soup.decode("utf-8", errors="replace"), byte_soup.decode("latin-1"),
             scattered, glued[: rng.randrange(len(glued))]]
    for text in texts:
        _assert_same(native, reference, text)
    flat = native.encode_flat(texts, eod=False)
    assert flat.ids.tolist() == [i for t in texts for i in reference.encode(t)]


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("text,position", [
    ("\ud800", 0),                      # 2-byte kind
    ("ok \udfff then", 3),
    ("a\U0001f600\ud83d", 2),           # 4-byte kind
    ("é\ud83d\ude00 a pair as two code points", 1),
    ("x" * 5000 + "中\udc80", 5001),    # past encode()'s stack buffer
])
def test_lone_surrogate_raises_typed_error(impl, text, position, native, reference):
    tok = native if impl == "native" else reference
    with pytest.raises(TokenizationError) as info:
        tok.encode(text)
    assert info.value.position == position and f"position {position}" in str(info.value)
    with pytest.raises(TokenizationError) as info:
        tok.encode_batch(["fine", text])
    assert (info.value.index, info.value.position) == (1, position)
    # encode_flat lists it and goes on with the others.
    flat = tok.encode_flat(["fine", text, "also fine"])
    assert flat.errors == [(1, position)]
    fine, also = reference.encode("fine"), reference.encode("also fine")
    assert flat.ids.tolist() == fine + [0] + also + [0]
    assert flat.offsets.tolist() == [0, len(fine) + 1, len(fine) + 1, len(fine) + len(also) + 2]
    assert flat.text_bytes == len("fine") + len("also fine")


def test_batch_api_equals_per_text(native, reference):
    # The last two are long enough for encode() to leave its stack buffers and run without the GIL.
    texts = list(TEXTS.values()) * 3 + ["", "a", "\u4e2d" * 3000, TEXTS["code"] * 250 + TEXTS["emoji"]]
    expected = [reference.encode(t) for t in texts]
    assert native.encode_batch(texts) == expected
    for eod, tail in ((True, [EOD_ID]), (False, [])):
        flat = native.encode_flat(texts, eod=eod)
        assert flat.ids.dtype == np.uint16 and flat.offsets.dtype == np.int64
        assert flat.offsets[0] == 0 and len(flat.offsets) == len(texts) + 1
        assert [flat.ids[a:b].tolist() for a, b in zip(flat.offsets, flat.offsets[1:])] == [
            e + tail for e in expected]
        assert flat.text_bytes == sum(len(t.encode("utf-8")) for t in texts)
        # The pure-Python fallback of the base class gives the same result.
        slow = reference.encode_flat(texts, eod=eod)
        np.testing.assert_array_equal(slow.ids, flat.ids)
        np.testing.assert_array_equal(slow.offsets, flat.offsets)
    empty = native.encode_flat([])
    assert empty.ids.size == 0 and empty.offsets.tolist() == [0] and empty.errors == [] and empty.text_bytes == 0
    # A tuple, and texts that are not str.
    assert native.encode_flat(tuple(texts[:3])).ids.tolist() == native.encode_flat(texts[:3]).ids.tolist()
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        native.encode_flat(["a", b"bytes"])


def test_concurrent_batches_in_threads(native, reference):
    # encode_flat runs without the GIL: overlapping calls must not disturb each other.
    texts = [TEXTS["cjk"] * 50, TEXTS["code"] * 200, TEXTS["emoji"] * 80, TEXTS["latin1_only"] * 90]
    expected = native.encode_flat(texts).ids.tolist()
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(native.encode_flat(texts).ids.tolist() == expected)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80 and all(results)
    assert expected == [i for t in texts for i in reference.encode(t) + [0]]


def test_other_vocabulary_where_prefixes_are_not_entries(tmp_path, reference):
    # A small vocabulary: every single byte, entries whose prefixes are not entries (the walk must fall back to
    # the last entry it passed), one byte string under two ids (the higher wins, as in the reference's trie).
    singles = [bytes([b]) for b in range(256)]
    multi = [b"abcd", b"ab", b"abcdefgh", b"\xe4\xb8\xad\xe6\x96\x87", b"  ", b"    " * 8, b"zz", b"zz"]
    lines = [f"{i} {tok!r} {len(tok)}" for i, tok in enumerate(singles + multi, start=1)]
    path = tmp_path / "tiny_vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    small_native, small_ref = load_tokenizer(path, impl="native"), load_tokenizer(path, impl="reference")
    assert small_native.fingerprint == small_ref.fingerprint != reference.fingerprint
    rng = random.Random(5)
    pieces = ["a", "b", "c", "d", "abc", "abcdefg", "中文", "中", " ", "zz", "z", "é"]
    for _ in range(50):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60)))
        assert small_native.encode(text) == small_ref.encode(text), text
    # "abcd" (257; "abcdefg" is only a prefix), then e, f, g, and "zz" under its higher id (264).
    assert small_native.encode("abcdefgzz") == [257, ord("e") + 1, ord("f") + 1, ord("g") + 1, 264]


def test_vocabulary_without_every_single_byte_is_refused(tmp_path):
    path = tmp_path / "no_bytes.txt"
    path.write_text("1 'a' 1\n2 'b' 1\n3 'ab' 2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="single byte 0x00"):
        load_tokenizer(path, impl="native")
    module = importlib.import_module(tokenizer_module.NATIVE_MODULE)
    with pytest.raises(ValueError):
        module.Encoder([b""])
    with pytest.raises(ValueError, match=r"tokens\[2\]"):
        module.Encoder([b"", b"a", "not bytes"])


def test_pickle_and_identity(native, reference):
    clone = pickle.loads(pickle.dumps(native))
    assert (clone.impl, clone.fingerprint) == ("native", reference.fingerprint)
    assert clone.encode(TEXTS["code"]) == reference.encode(TEXTS["code"])
    assert native.vocab_size == 65536 and native.eod_id == 0 and native.name == "rwkv_vocab_v20230424"


def test_falls_back_to_fast_when_the_extension_is_missing(monkeypatch, caplog):
    # None in sys.modules makes the import fail as if the extension had never been built.
    monkeypatch.setitem(sys.modules, tokenizer_module.NATIVE_MODULE, None)
    default_impl.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="data_prep.tokenizer"):
            tok = load_tokenizer()
            again = load_tokenizer()
        assert tok.impl == again.impl == "fast"
        lines = [r.getMessage() for r in caplog.records if r.name == "data_prep.tokenizer"]
        assert len(lines) == 1 and "impl='fast'" in lines[0] and "not built" in lines[0]
        assert tok.encode(TEXTS["cjk"]) == load_tokenizer(impl="reference").encode(TEXTS["cjk"])
        with pytest.raises(TokenizerError, match="pip install -e"):
            load_tokenizer(impl="native")
    finally:
        default_impl.cache_clear()
    monkeypatch.undo()
    assert load_tokenizer().impl == "native"


def test_shipped_vocabulary_path_is_the_default(native):
    assert native.vocab_path == Path(DEFAULT_VOCAB_PATH)
