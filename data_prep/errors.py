"""Typed errors of `data_prep`, and `PipelineError`, the base of the whole project's errors.

`PipelineError` lives here because `data_prep` is the lowest layer that raises errors and imports nothing of
ours; `rwkv5.errors.Rwkv5Error` derives from it, and the CLI turns it into a one-line message. Messages name
the file (or repo) and the problem."""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "DataPrepError",
    "SelectionError",
    "SourceError",
    "DownloadError",
    "ShardError",
    "TokenizerMismatchError",
    "ErrorBudgetExceeded",
    "InputReadError",
    "TruncatedInputError",
    "TokenizerError",
    "TokenizationError",
    "SampleError",
    "PackingError",
]


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class DataPrepError(PipelineError):
    """Base of every error `data_prep` raises on purpose."""


class SelectionError(DataPrepError, ValueError):
    """A file selection (split, chunk, glob, fraction) is invalid; the message names the field and value."""


class SourceError(DataPrepError):
    """The source cannot be listed or read: unknown repo or revision, access denied, missing directory."""


class DownloadError(DataPrepError):
    """Some files could not be fetched and verified after all retries.

    Raised after every other file was handled and the manifest written, so a re-run only retries these.

    Args:
        message: names the failed files and why each failed.
        summary: the run's `DownloadSummary` (files downloaded, skipped, failed).
    """

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class ShardError(DataPrepError):
    """A token shard or dataset manifest is missing, corrupt, unlisted or inconsistent; the message names the file."""


class TokenizerMismatchError(ShardError):
    """A shard or manifest was written by a different tokenizer than the one the caller expects.

    Token ids of two tokenizers are not interchangeable, so reading them would train on garbage silently.
    """


class ErrorBudgetExceeded(DataPrepError):
    """A stage met more bad input than its error budget allows.

    Args:
        message: names the budget, the observed counts and the worst files.
        summary: the stage's summary object, so callers can still report what was done.
    """

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class InputReadError(DataPrepError):
    """An input file cannot be read to its end (I/O error, corrupt zstd data); the message names the file."""


class TruncatedInputError(InputReadError):
    """An input file ends inside a zstd frame (a partial download or copy); the message names the file."""


class TokenizerError(DataPrepError):
    """A tokenizer cannot be built: unknown implementation, missing or malformed vocabulary file."""


class TokenizationError(DataPrepError, ValueError):
    """Text or token ids that the tokenizer cannot handle, e.g. a lone surrogate (not encodable as UTF-8).

    The tokenization stage counts these per document instead of failing, so the error carries where it is.

    Args:
        message: names the problem and its position.
        position: character index in the text (encode) or index in the id sequence (decode).
        index: which text of a batch, or None for a single call.
    """

    def __init__(self, message: str, position: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.position = position
        self.index = index


class SampleError(DataPrepError):
    """The sample corpus cannot be built: invalid sizes, an output folder we did not write, too little text."""


class PackingError(DataPrepError):
    """Long samples cannot be packed from a dataset: bad sizes, unknown sources, or too few tokens."""
