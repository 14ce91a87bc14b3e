"""The RWKV World tokenizer for Hugging Face transformers (`AutoTokenizer`, `trust_remote_code=True`).

Written by rwkv5-pipeline and copied into every release's Hugging Face folder with the vocabulary file, so it
imports only transformers. It encodes and decodes exactly as the pipeline's tokenizer (data_prep.tokenizer):
greedy longest match over the text's UTF-8 bytes; id 0 is the end of document and stands for no bytes, as do
the unused ids past the vocabulary; bytes that are not valid UTF-8 decode to U+FFFD.

Vocabulary entries are byte strings, and transformers' tokens are str: a token here is its bytes read as
Latin-1 (one character per byte), which maps every byte string to a distinct str and back.
"""

from __future__ import annotations

import ast
import os

from transformers import PreTrainedTokenizer

__all__ = ["Rwkv5Tokenizer"]

VOCAB_FILE = "rwkv_vocab_v20230424.txt"


def _read_vocab(path: str) -> dict[bytes, int]:
    """Entries of a vocabulary file: one a line, `<id> <Python str or bytes literal> <byte length>`."""
    entries = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.find(" "), line.rfind(" ")
            literal = ast.literal_eval(line[first + 1:last])
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if len(token) != int(line[last + 1:]):
                raise ValueError(f"{path}:{lineno}: entry {token!r} has {len(token)} bytes, the line says "
                                 f"{line[last + 1:]}")
            entries[token] = int(line[:first])
    return entries


class Rwkv5Tokenizer(PreTrainedTokenizer):
    """RWKV World tokenizer: greedy longest match over UTF-8 bytes, ids 1..65529, 0 = end of document.

    Args:
        vocab_file (str): the vocabulary (`rwkv_vocab_v20230424.txt`).
        vocab_size (int): ids the model has (65536); ids past the vocabulary decode to nothing. Default: 65536.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, vocab_size: int = 65536, **kwargs):
        self.vocab_file = vocab_file
        self._ids = _read_vocab(vocab_file)
        self._ids[b""] = 0
        self._bytes = {i: b for b, i in self._ids.items()}
        self._size = max(vocab_size, max(self._bytes) + 1)
        # Longest match without a trie: the lengths of the entries that start with each two-byte prefix, longest
        # first; the first length whose slice is an entry is the longest match (single bytes are all entries).
        by_prefix: dict[bytes, set[int]] = {}
        for token in self._ids:
            if len(token) >= 2:
                by_prefix.setdefault(token[:2], set()).add(len(token))
        self._lengths = {p: sorted(ls, reverse=True) for p, ls in by_prefix.items()}
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        return {b.decode("latin-1"): i for b, i in self._ids.items()}

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of a UTF-8 byte string."""
        ids, i, n = [], 0, len(data)
        while i < n:
            end = i + 1
            for length in self._lengths.get(data[i:i + 2], ()):
                if i + length <= n and data[i:i + length] in self._ids:
                    end = i + length
                    break
            ids.append(self._ids[data[i:end]])
            i = end
        return ids

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"rwkv5 tokenizer: character {exc.start} of the text (U+{ord(text[exc.start]):04X}) "
                             "has no UTF-8 encoding (a lone surrogate)") from None
        return [self._bytes[i].decode("latin-1") for i in self.encode_bytes(data)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids[token.encode("latin-1")]

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self._size:
            raise ValueError(f"rwkv5 tokenizer: token id {index} is outside 0..{self._size - 1}")
        return self._bytes.get(index, b"").decode("latin-1")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("latin-1").decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the vocabulary back in its own format (ids in order), for `save_pretrained`."""
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            for token, i in sorted(self._ids.items(), key=lambda item: item[1]):
                if i:
                    f.write(f"{i} {self._literal(token)} {len(token)}\n")
        return (path,)

    @staticmethod
    def _literal(token: bytes) -> str:
        try:
            return repr(token.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(token)
