"""Flow runs orphaned by a dead worker: marked crashed, then scheduled again for the new worker.

A process worker runs each flow run as its child; when the worker dies (killed, machine rebooted) its runs stay
"Running" on the server forever, because nothing is left to report their end. Prefect's own way out (flow-run
heartbeats plus an automation that marks silent runs crashed) only marks them crashed after a timeout and never
schedules them again, so this stays hand-written. `rwkv5 up` starts a worker only when none of ours is alive,
so at that moment every Running or Pending run of our local work pool is such an orphan. So is a run that
crashed after the dead worker started: killed with its worker, a run can still record "Crashed" on its way out
("aborted by Python system exit call"), and Prefect never retries a crashed run by itself. A run whose own
process outlived the worker (the process worker starts each run in a session of its own) and still runs here is
left alone. `rwkv5 down` stops the worker with its runs and records their ids: whatever state stopping left
them in (Running, Crashed, Failed, Cancelled), they are scheduled again unless they completed meanwhile.
Scheduling the others again is safe because every stage is idempotent: download and tokenization skip finished
files, pretraining resumes from its last checkpoint, and a milestone already released is not released again.

    python -m rwkv5_app.stack.recovery local-process [SINCE|-] [RUN_ID ...]   # what `rwkv5 up` runs

SINCE (ISO 8601) is when the dead worker started; without it (`-`) crashed runs are left alone. RUN_IDs are the
flow runs `down` interrupted. PREFECT_API_URL must be set.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable
from datetime import datetime

from rwkv5_app.stack.processes import _flow_run_id, _processes

__all__ = ["reschedule_orphaned_runs"]


def reschedule_orphaned_runs(work_pool: str, crashed_since: datetime | None = None,
                             interrupted: Iterable[str] = ()) -> list[str]:
    """Crash, then reschedule, every Running or Pending flow run of `work_pool`, every run that crashed at
    or after `crashed_since`, and every run of `interrupted` (ids) that did not complete; returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed, Scheduled

    types = [StateType.RUNNING, StateType.PENDING] + ([StateType.CRASHED] if crashed_since else [])
    stopped = {str(uuid.UUID(run)) for run in interrupted}
    rescheduled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])),
        )
        if stopped:
            known = {str(run.id) for run in runs}
            runs += [run for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[uuid.UUID(run) for run in sorted(stopped)]))) if str(run.id) not in known]
        alive = _flow_runs_alive_here()
        for run in runs:
            if str(run.id) in alive:
                continue  # its process outlived the worker and is still running it: not an orphan
            if str(run.id) in stopped:
                if run.state is None or run.state.type in (StateType.COMPLETED, StateType.SCHEDULED):
                    continue  # done meanwhile, or already waiting for a worker
                if run.state.type in (StateType.RUNNING, StateType.PENDING, StateType.CANCELLING):
                    client.set_flow_run_state(run.id, Crashed(message="stopped by `rwkv5 down`; rescheduled by "
                                                              "`rwkv5 up`"), force=True)
            elif run.state.type == StateType.CRASHED:
                if run.state.timestamp < crashed_since:
                    continue  # crashed under an earlier worker: someone has seen it, not ours to retry
            else:
                # Crashed first, so the run's history shows what happened and its concurrency slot is released.
                client.set_flow_run_state(run.id, Crashed(message="its worker died; rescheduled by `rwkv5 up`"),
                                          force=True)
            # At its first expected start, so it keeps its place before runs created after it (milestones).
            client.set_flow_run_state(run.id, Scheduled(scheduled_time=run.expected_start_time or run.created,
                                                        message="rescheduled after its worker died"), force=True)
            rescheduled.append(run.name)
    return rescheduled


def _flow_runs_alive_here() -> set[str]:
    """Ids of the flow runs some process of this machine is running (a process worker starts each in its own
    session with PREFECT__FLOW_RUN_ID set, so it can outlive a killed worker)."""
    return {run for pid, state, _, _ in _processes() if state != "Z" and (run := _flow_run_id(pid)) is not None}


def main() -> None:
    since = datetime.fromisoformat(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    for name in reschedule_orphaned_runs(sys.argv[1], since, sys.argv[3:]):
        print(name)


if __name__ == "__main__":
    main()
