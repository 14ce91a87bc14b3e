"""A stand-in tokenizer for model tests with a small vocabulary: one id per UTF-8 byte (ids 1..256)."""

from __future__ import annotations

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Ids 1..256 are the bytes 0..255; id 0 (end of document) and ids above 256 decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if 0 < i <= 256).decode(errors="replace")
