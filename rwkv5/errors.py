"""Typed errors: callers catch these, the CLI turns them into one-line messages."""

__all__ = ["Rwkv5Error", "ConfigError", "ShardError", "CheckpointError", "TokenizerError", "DataError"]


class Rwkv5Error(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(Rwkv5Error, ValueError):
    """A configuration value is invalid; the message names the dotted field."""


class CheckpointError(Rwkv5Error):
    """A checkpoint is missing, corrupt or does not match the model; the message names the file and key."""


class ShardError(Rwkv5Error):
    """A token shard or dataset manifest is unusable; the message names the file."""


class TokenizerError(Rwkv5Error):
    """Text or ids that the tokenizer cannot handle."""


class DataError(Rwkv5Error):
    """Source data is missing or malformed beyond the allowed error budget."""
