"""Typed errors of `data_prep`. It must not import `rwkv5`, so it has its own base class; the CLI maps it to a
one-line message like `rwkv5.errors.Rwkv5Error`. Messages name the file (or repo) and the problem."""

from __future__ import annotations

__all__ = ["DataPrepError", "SelectionError", "SourceError", "DownloadError"]


class DataPrepError(Exception):
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
