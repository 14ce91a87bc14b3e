"""Where the pipeline keeps things under the state directory; one place, so flows and hooks agree."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "artifact_key"]


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


@dataclass(frozen=True)
class Layout:
    """Folders of one state directory.

    Args:
        root (Path): the state directory. Default in callers: $RWKV5_HOME or ./.state.
    """

    root: Path

    @classmethod
    def default(cls, root: str | None = None) -> "Layout":
        return cls(Path(root or os.environ.get("RWKV5_HOME", ".state")).resolve())

    def source_dir(self, name: str) -> Path:
        """Raw SlimPajama-layout files of one source (downloaded or built)."""
        return self.root / "data" / artifact_key(name) / "raw"

    def tokens_dir(self, name: str) -> Path:
        """Tokenized splits of one source: tokens/train, tokens/validation."""
        return self.root / "data" / artifact_key(name) / "tokens"

    @property
    def checkpoints(self) -> Path:
        """Ray Train storage_path: one folder per run name."""
        return self.root / "checkpoints"

    @property
    def finetunes(self) -> Path:
        """Fine-tune runs' storage (one folder per milestone: checkpoints, trace, the tuned model)."""
        return self.root / "finetunes"

    def releases(self, run_name: str) -> Path:
        return self.root / "releases" / run_name

    def milestone_results(self, run_name: str) -> Path:
        return self.root / "milestones" / run_name

    def long_context(self, run_name: str) -> Path:
        """The long-context stage's work folder of one run: packed samples, the per-position plot."""
        return self.root / "longctx" / run_name
