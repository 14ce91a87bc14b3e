"""GPU tests: skipped as a folder when no CUDA device is visible (CI), run on an H200 by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def error_table():
    """Rows of measured relative errors; printed at the end and written to `$RWKV5_ERROR_TABLE` if set."""
    rows: list[dict] = []
    yield rows
    if not rows:
        return
    names = sorted({key for row in rows for key in row if key != "case"})
    lines = ["case".ljust(44) + "".join(n.rjust(10) for n in names)]
    for row in rows:
        lines.append(row["case"].ljust(44) + "".join(
            (f"{row[n]:10.2e}" if n in row else " " * 10) for n in names))
    print("\n" + "\n".join(lines))
    target = os.environ.get("RWKV5_ERROR_TABLE")
    if target:
        tmp = Path(target).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, target)
