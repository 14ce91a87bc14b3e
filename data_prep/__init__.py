"""SlimPajama data: listing and download, reading .jsonl.zst, tokenization, Arrow shards, packed loader.

This package imports nothing else of ours: the model side depends on it, never the reverse.
"""
