"""A run's loss history: the per-step rows `TraceCallback` appends, read back by `read_trace`, and drawn by
`loss_curve_png`, the one plotter behind the dashboard's loss-curve artifact and a release's model card."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["read_trace", "loss_history", "loss_curve_png"]


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


def loss_history(rows: Iterable[dict], before_step: int | None = None) -> list[tuple[int, float]]:
    """(step, loss) pairs of trace rows, optionally only those before `before_step` (a milestone's curve)."""
    return [(row["step"], row["loss"]) for row in rows if before_step is None or row["step"] < before_step]


def loss_curve_png(history: Sequence[tuple[float, float]], title: str, skipped: Sequence[float] = (),
                   xlabel: str = "optimizer step") -> bytes:
    """Training loss against step (or tokens) as PNG bytes; `skipped` x values are marked as skipped steps.

    The bytes are a pure function of the inputs (no software version in the PNG metadata), so a release built
    again from the same inputs is byte-identical and a re-run finds nothing to upload.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    xs, ys = zip(*history)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        ax.plot(xs, ys, lw=1.2, label="loss")
        losses = dict(history)
        if skipped:
            ax.scatter(skipped, [losses[x] for x in skipped], color="red", s=12, label="step skipped", zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        return figure_png(fig)
    finally:
        plt.close(fig)


def figure_png(fig) -> bytes:
    """A laid-out matplotlib figure as PNG bytes without the software version in its metadata: the same inputs
    give the same bytes, so a release built again finds nothing to upload."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
