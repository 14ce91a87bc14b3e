"""The loss-curve image of a run, for the Prefect dashboard (an inline PNG in a markdown artifact) and MLflow."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

__all__ = ["read_trace", "loss_curve_png", "image_markdown"]


def read_trace(path: str | Path) -> list[dict]:
    """Rows of a `TraceCallback` file by step; a step run again after a restart replaces the earlier row.

    Lines that are not complete JSON (a process killed mid-write) are skipped: the file is a log, and the
    step is in the checkpoint that training resumed from anyway.
    """
    rows: dict[int, dict] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def loss_curve_png(rows: list[dict], title: str) -> bytes:
    """Training loss against step (skipped steps marked), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], lw=1.2, label="loss")
        skipped = [r for r in rows if not r.get("applied", True)]
        if skipped:
            ax.scatter([r["step"] for r in skipped], [r["loss"] for r in skipped], color="red", s=12,
                       label="step skipped", zorder=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def image_markdown(png: bytes, alt: str) -> str:
    """Markdown showing `png` inline (a data URI), so the artifact needs no file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
