"""Milestone runs started by the pretrain flow itself, one at a time, while pretraining waits (mode `shared`).

Pretraining has stopped at the milestone and its Ray Train run has ended, so the GPUs are free. Each milestone
becomes a flow run of the same `milestone/auto` deployment that the event starts in `dedicated` mode, so the UI,
the work queue and the milestone table are the same in both modes; here it is also a subflow of the pretrain
flow run. The run is created with an idempotency key of (run, percent): a retried or re-run pretrain flow finds
the milestone's run instead of creating a second one, and schedules it again if it had failed or crashed.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Scheduled

from rwkv5.errors import Rwkv5Error

__all__ = ["MILESTONE_DEPLOYMENT", "MilestoneRunFailed", "run_milestone"]

MILESTONE_DEPLOYMENT = "milestone/auto"


class MilestoneRunFailed(Rwkv5Error):
    """A milestone's flow run ended in a state other than Completed; pretraining does not resume past it."""


def _final_state(client, flow_run_id: UUID, poll_s: float):
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        time.sleep(poll_s)


def run_milestone(parameters: dict, poll_s: float = 0.5) -> UUID:
    """Run the milestone flow for one milestone (`flows.events.milestone_parameters`) and wait for its end.

    Pretraining resumes only when this returns, so the poll interval is dead time of every pause (half of it
    on average); a poll is one flow-run read from the Prefect server.

    Returns:
        The milestone flow run's id.

    Raises:
        MilestoneRunFailed: the run ended Failed, Crashed or Cancelled (after one new attempt, when an earlier
            pretrain attempt had left it so).
    """
    run, percent = parameters["run"], parameters["percent"]
    flow_run = run_deployment(MILESTONE_DEPLOYMENT, parameters=parameters, timeout=0,
                              idempotency_key=f"rwkv5-milestone/{run}/{percent}",
                              flow_run_name=f"{run}-m{percent:03d}")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
        if state is not None and state.is_final() and not state.is_completed():
            client.set_flow_run_state(flow_run.id, Scheduled(), force=True)  # the same run, once more
        state = _final_state(client, flow_run.id, poll_s)
    if not state.is_completed():
        raise MilestoneRunFailed(f"milestone {percent}% of run {run!r}: flow run {flow_run.name} ended "
                                 f"{state.type.value} ({state.message or 'no message'})")
    return flow_run.id
