"""Training hooks that talk to Prefect: milestone events and the token-budget progress artifact.

They run inside Ray workers (rank 0 only), so they need `PREFECT_API_URL` in the worker environment
(`rwkv5.train.launch` forwards it); without it Prefect would send events to a throwaway server.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from rwkv5.train.callbacks import Callback, MilestoneInfo, StepInfo
from rwkv5.train.milestone_settings import MilestoneSettings
from rwkv5.train.milestones import percent_of

__all__ = ["MILESTONE_EVENT", "PROGRESS_EVENT", "RELEASED_EVENT", "progress_line", "milestone_event_id",
           "run_resource_id", "milestone_parameters", "long_context_parameters", "emit_last_release",
           "PrefectMilestoneEvents", "PrefectProgress", "budget_percent", "emit_progress_line"]

logger = logging.getLogger(__name__)

MILESTONE_EVENT = "rwkv5.pretrain.milestone"
PROGRESS_EVENT = "rwkv5.pretrain.progress"
"""Emitted every `PrefectProgress.every_steps`; `prefect deployment run ... --watch` prints its resource name,
which is the readable progress line (`progress_line`)."""
RELEASED_EVENT = "rwkv5.milestone.released"
"""Emitted by the milestone flow once the last milestone is released, in a run with a long-context stage
(`MilestoneSettings.long_context`); the `longctx/auto` deployment's trigger starts the stage from it."""
_NAMESPACE = uuid.UUID("5b0f2a7e-8d0e-4c47-9a55-7f3c1f0a5e52")


def milestone_event_id(run_name: str, percent: int) -> uuid.UUID:
    """The same id for the same milestone of the same run: the server drops a re-sent event."""
    return uuid.uuid5(_NAMESPACE, f"{run_name}/{percent}")


def run_resource_id(run_name: str) -> str:
    return f"rwkv5.run.{run_name}"


def milestone_parameters(run_name: str, info: dict, settings: MilestoneSettings,
                         checkpoint_uri_prefix: str = "file://") -> dict:
    """The milestone flow's parameters for one milestone (`info`: percent, step, tokens_seen, path): what the
    event carries in `dedicated` mode and what the pretrain flow passes in `shared` mode."""
    return {"run": run_name, "percent": info["percent"], "step": info["step"], "tokens_seen": info["tokens_seen"],
            "checkpoint_uri": f"{checkpoint_uri_prefix}{info['path']}", "settings": settings.model_dump()}


@dataclass
class PrefectMilestoneEvents(Callback):
    """Emits `rwkv5.pretrain.milestone` for each milestone; the milestone deployment's trigger picks it up
    (milestone mode `dedicated`).

    Args:
        run_name (str): the pretraining run.
        settings (MilestoneSettings): what each milestone run does (fine-tune workers and steps, chat data,
            evaluation, release); one payload field, so one milestone deployment serves runs of every size.
        checkpoint_uri_prefix (str): prepended to the milestone path to form the event's checkpoint URI
            (e.g. "file://"; an object-store prefix on clusters).
    """

    run_name: str = ""
    settings: MilestoneSettings = field(default_factory=MilestoneSettings)
    checkpoint_uri_prefix: str = "file://"

    def on_milestone(self, info: MilestoneInfo) -> None:
        if self.ctx.rank != 0:
            return
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        percent = percent_of(info.index, self.ctx.config.milestones.fraction)
        row = {"percent": percent, "step": info.step, "tokens_seen": info.tokens_seen, "path": info.path}
        emit_event(
            event=MILESTONE_EVENT,
            resource={"prefect.resource.id": run_resource_id(self.run_name), "prefect.resource.name": self.run_name},
            payload=milestone_parameters(self.run_name, row, self.settings, self.checkpoint_uri_prefix)
            | {"index": info.index},
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

        config = self.ctx.config
        progress = budget_percent(info.tokens_seen, config.token_budget)
        try:
            update_progress_artifact(artifact_id=uuid.UUID(self.artifact_id), progress=progress)
            if self.run_name:
                emit_progress_line(self.run_name,
                                   progress_line(self.run_name, info, config.total_steps, config.token_budget))
        except Exception as exc:  # the dashboard must never stop training
            logger.warning("progress update failed: %s", exc)


def emit_progress_line(run_name: str, line: str) -> None:
    """One line for the terminal that watches the flow run (`--watch` prints the event's resource name)."""
    from prefect.events import emit_event

    emit_event(event=PROGRESS_EVENT, resource={"prefect.resource.id": run_resource_id(run_name),
                                               "prefect.resource.name": line})


def long_context_parameters(run_name: str, checkpoint_uri: str, settings: MilestoneSettings) -> dict:
    """The `longctx` flow's parameters for a run's milestone checkpoint: the run's long-context settings, with
    the pretraining source filled in (the samples come from its training shards)."""
    stage = settings.long_context.model_copy(update={"data_source": settings.data_source})
    return {"run": run_name, "checkpoint": checkpoint_uri, "settings": stage.model_dump()}


def emit_last_release(run_name: str, info: dict, settings: MilestoneSettings) -> None:
    """`RELEASED_EVENT` for the run's last milestone (`info`: percent, step, tokens_seen, path), sent once: the
    server drops a re-sent event with the same id."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    payload = long_context_parameters(run_name, f"file://{info['path']}", settings)
    emit_event(event=RELEASED_EVENT,
               resource={"prefect.resource.id": run_resource_id(run_name), "prefect.resource.name": run_name},
               payload=payload | {"percent": info["percent"], "step": info["step"]},
               id=uuid.uuid5(_NAMESPACE, f"{run_name}/released/{info['percent']}"))
    EventsWorker.drain_all(timeout=30)  # delivered before the flow run's process ends
