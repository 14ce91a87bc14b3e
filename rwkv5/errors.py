"""Typed errors of `rwkv5`: callers catch these, the CLI turns them into one-line messages."""

from data_prep.errors import PipelineError

__all__ = ["PipelineError", "Rwkv5Error", "ConfigError", "CheckpointError", "DataError"]


class Rwkv5Error(PipelineError):
    """Base of every error `rwkv5` raises on purpose."""


class ConfigError(Rwkv5Error, ValueError):
    """A configuration value is invalid; the message names the dotted field."""


class CheckpointError(Rwkv5Error):
    """A checkpoint is missing, corrupt or does not match the model; the message names the file and key."""


class DataError(Rwkv5Error):
    """Source data is missing or malformed beyond the allowed error budget."""
