"""Dashboard artifacts of a pretraining run: the token-budget bar, links to MLflow and Ray, the loss curve."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact

from flows.paths import artifact_key

__all__ = ["image_markdown", "run_dashboard", "publish_loss_curve"]


def image_markdown(png: bytes, alt: str) -> str:
    """Markdown showing `png` inline (a data URI), so the artifact needs no file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def run_dashboard(run_name: str) -> str:
    """The run's token-budget progress artifact (its id; training updates it) and links to MLflow and to the
    Ray dashboard where the stack set them."""
    progress_id = create_progress_artifact(progress=0.0, key=artifact_key("budget", run_name),
                                           description=f"{run_name}: tokens seen / token budget")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        create_link_artifact(key=artifact_key("mlflow", run_name), link=mlflow_uri, link_text="MLflow runs")
    ray_dashboard = os.environ.get("RWKV5_RAY_DASHBOARD")
    if ray_dashboard:
        create_link_artifact(key=artifact_key("ray", run_name), link=ray_dashboard, link_text="Ray dashboard")
    return str(progress_id)


def publish_loss_curve(run_name: str, trace: Path) -> None:
    """The loss curve as an image artifact, as loss_curve.png beside the trace, and into the run's MLflow run
    when a tracking server is configured."""
    from data_prep.atomic import atomic_write_bytes
    from rwkv5.train.trace import loss_curve_png, loss_history, read_trace

    rows = read_trace(trace)
    if not rows:
        return
    skipped = [row["step"] for row in rows if not row.get("applied", True)]
    png = loss_curve_png(loss_history(rows), f"{run_name}: training loss", skipped)
    last = rows[-1]
    create_markdown_artifact(
        key=artifact_key("loss-curve", run_name),
        markdown=f"### {run_name}: training loss\n\n{image_markdown(png, 'training loss')}\n\n"
                 f"{len(rows)} steps, last loss {last['loss']:.4f} at step {last['step']}.",
        description="Training loss by optimizer step",
    )
    image = trace.with_name("loss_curve.png")
    atomic_write_bytes(image, png)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from rwkv5.tracking import log_run_artifact

        log_run_artifact(run_name, image)
