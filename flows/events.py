"""Training hooks that talk to Prefect: milestone events and the token-budget progress artifact.

They run inside Ray workers (rank 0 only), so they need `PREFECT_API_URL` in the worker environment
(`rwkv5.train.launch` forwards it); without it Prefect would send events to a throwaway server.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from rwkv5.train.callbacks import Callback, MilestoneInfo, StepInfo
from rwkv5.train.milestones import percent_of

__all__ = ["MILESTONE_EVENT", "PROGRESS_EVENT", "progress_line", "milestone_event_id", "run_resource_id",
           "PrefectMilestoneEvents",
           "PrefectProgress", "budget_percent"]

logger = logging.getLogger(__name__)

MILESTONE_EVENT = "rwkv5.pretrain.milestone"
PROGRESS_EVENT = "rwkv5.pretrain.progress"
"""Emitted every `PrefectProgress.every_steps`; `prefect deployment run ... --watch` prints its resource name,
which is the readable progress line (`progress_line`)."""
_NAMESPACE = uuid.UUID("5b0f2a7e-8d0e-4c47-9a55-7f3c1f0a5e52")


def milestone_event_id(run_name: str, percent: int) -> uuid.UUID:
    """The same id for the same milestone of the same run: the server drops a re-sent event."""
    return uuid.uuid5(_NAMESPACE, f"{run_name}/{percent}")


def run_resource_id(run_name: str) -> str:
    return f"rwkv5.run.{run_name}"


@dataclass
class PrefectMilestoneEvents(Callback):
    """Emits `rwkv5.pretrain.milestone` for each milestone; the milestone deployment's trigger picks it up.

    Args:
        run_name (str): the pretraining run.
        checkpoint_uri_prefix (str): prepended to the milestone path to form the event's checkpoint URI
            (e.g. "file://"; an object-store prefix on clusters).
        finetune_workers (int): Ray Train workers for the milestone's fine-tune, 0 = in the milestone flow's
            own process; sent in the payload, so one milestone deployment serves runs of every size.
        gpus_per_worker (float): GPUs of each of those workers (a fraction shares a GPU).
        lambada (str): the LAMBADA file the milestone evaluation scores ("shipped", a path or an fsspec URL;
            "" for none), and eval_limit (int) the validation windows and passages it scores; also in the payload.
        finetune_steps (int): optimizer steps of the milestone's chat fine-tune; in the payload.
        data_source (str): the pretraining source ("sample", a Hub repo id, a folder): the milestone evaluates
            its validation split and names it in the model card.
    """

    run_name: str = ""
    checkpoint_uri_prefix: str = "file://"
    finetune_workers: int = 1
    gpus_per_worker: float = 0
    lambada: str = ""
    eval_limit: int = 64
    data_source: str = "sample"
    finetune_steps: int = 10

    def on_milestone(self, info: MilestoneInfo) -> None:
        if self.ctx.rank != 0:
            return
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        percent = percent_of(info.index, self.ctx.config.milestones.fraction)
        emit_event(
            event=MILESTONE_EVENT,
            resource={"prefect.resource.id": run_resource_id(self.run_name), "prefect.resource.name": self.run_name},
            payload={
                "run": self.run_name,
                "percent": percent,
                "index": info.index,
                "step": info.step,
                "tokens_seen": info.tokens_seen,
                "checkpoint_uri": f"{self.checkpoint_uri_prefix}{info.path}",
                "finetune_workers": self.finetune_workers,
                "gpus_per_worker": self.gpus_per_worker,
                "lambada": self.lambada,
                "eval_limit": self.eval_limit,
                "data_source": self.data_source,
                "finetune_steps": self.finetune_steps,
            },
            id=milestone_event_id(self.run_name, percent),
        )
        EventsWorker.drain_all(timeout=30)  # delivered before training goes on (or the process dies)
        logger.info("emitted %s for %s at %d%%", MILESTONE_EVENT, self.run_name, percent)


def budget_percent(tokens_seen: int, token_budget: int) -> float:
    """The token-budget progress bar's value."""
    return min(100.0, 100.0 * tokens_seen / token_budget)


def progress_line(run_name: str, info: StepInfo, total_steps: int, token_budget: int) -> str:
    """`tiny-demo: step 40/200, 20% of the token budget, loss 6.812, 1.52 s/step`."""
    return (f"{run_name}: step {info.step + 1}/{total_steps}, {budget_percent(info.tokens_seen, token_budget):.0f}% "
            f"of the token budget, loss {info.loss:.3f}, {info.step_time_s:.2f} s/step")


@dataclass
class PrefectProgress(Callback):
    """Every `every_steps` steps: updates the token-budget progress artifact in place (created by the flow,
    passed by id) and emits `PROGRESS_EVENT`, whose line the terminal watching the flow run shows."""

    artifact_id: str = ""
    every_steps: int = 10
    run_name: str = ""

    def post_step(self, info: StepInfo, metrics: dict[str, float]) -> None:
        if self.ctx.rank != 0 or not self.artifact_id:
            return
        done = info.step + 1  # steps finished, counting this one
        if done % self.every_steps and done < self.ctx.config.total_steps:
            return
        from prefect.artifacts import update_progress_artifact
        from prefect.events import emit_event

        config = self.ctx.config
        progress = budget_percent(info.tokens_seen, config.token_budget)
        try:
            update_progress_artifact(artifact_id=uuid.UUID(self.artifact_id), progress=progress)
            if self.run_name:
                line = progress_line(self.run_name, info, config.total_steps, config.token_budget)
                emit_event(event=PROGRESS_EVENT, resource={"prefect.resource.id": run_resource_id(self.run_name),
                                                           "prefect.resource.name": line})
        except Exception as exc:  # the dashboard must never stop training
            logger.warning("progress update failed: %s", exc)
