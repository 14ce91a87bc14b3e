"""The README's folder table names every module of the packages, and names nothing that is not there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "data_prep", "rwkv5", "flows", "rwkv5_app")


def _folder_table(readme: str) -> dict[str, str]:
    """Row text of the architecture section's folder table, by folder (`rwkv5/train/` -> its cell)."""
    rows = {}
    for line in readme.splitlines():
        match = re.match(r"^\| `([\w/]+/)` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def _tracked_modules() -> list[Path]:
    files = subprocess.run(["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return [Path(f) for f in files if f.endswith((".py", ".c")) and not f.endswith("__init__.py")]


def _row_for(path: Path, rows: dict[str, str]) -> tuple[str, str]:
    """The most specific table row covering `path`, and the name the row must use for it."""
    for parent in [*path.parents][:-1]:
        key = f"{parent.as_posix()}/"
        if key in rows:
            return key, path.relative_to(parent).parts[0] if len(path.relative_to(parent).parts) > 1 else path.name
    raise AssertionError(f"README.md: no folder-table row covers {path}")


def test_readme_folder_table_matches_the_tracked_modules():
    rows = _folder_table((REPO / "README.md").read_text(encoding="utf-8"))
    missing = []
    for path in _tracked_modules():
        key, name = _row_for(path, rows)
        if f"`{name}" not in rows[key] and f"`{name}/" not in rows[key]:
            missing.append(f"{path} (row {key}, expected `{name}`)")
    assert not missing, "README.md's folder table does not name: " + ", ".join(missing)
    for key, cell in rows.items():
        for name in re.findall(r"`([\w./]+\.(?:py|c))`", cell):
            candidates = [REPO / key / name] + [p for p in (REPO / key).rglob(name)]
            assert any(p.is_file() for p in candidates), f"README.md names {key}{name}, which does not exist"
