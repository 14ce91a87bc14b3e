"""A small chat dataset built offline from the standard library's module docstrings.

The embedded demo fine-tunes milestones on it ("User: What is the `json` module for?\\n\\nAssistant: ...");
real runs pass their own chat JSONL. Deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

from data_prep.atomic import atomic_write_text

__all__ = ["build_chat_sample"]


def _module_summaries(limit: int) -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(stdlib.glob("*.py")):
        if path.stem.startswith("_") or path.stem in sys.builtin_module_names:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(first) <= 600:
                found.append((path.stem, first))
        if len(found) >= limit:
            break
    return found


def build_chat_sample(out_path: str | os.PathLike, limit: int = 200) -> Path:
    """Write `out_path` (JSONL, `text` in User/Assistant form) unless it exists; returns the path."""
    out = Path(out_path)
    if out.is_file():
        return out
    lines = [
        json.dumps({"text": f"User: What is the Python module `{name}` for?\n\nAssistant: {summary}"})
        for name, summary in _module_summaries(limit)
    ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
