"""Releases: a checkpoint exported with its tokenizer, model card and eval numbers, uploaded to a target."""

from rwkv5.release.publish import build_release, read_manifest, release, verify_release
from rwkv5.release.targets import ReleaseError, open_target

__all__ = ["build_release", "read_manifest", "release", "verify_release", "ReleaseError",
           "open_target"]
