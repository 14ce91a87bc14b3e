"""Flow runs orphaned by a dead worker: marked crashed, then scheduled again for the new worker.

A process worker runs each flow run as its child; when the worker dies (killed, machine rebooted) its runs
stay "Running" on the server forever, because nothing is left to report their end. `rwkv5 up` starts a
worker only when none of ours is alive, so at that moment every Running or Pending run of our local work
pool is such an orphan. Scheduling it again is safe because every stage is idempotent: download and
tokenization skip finished files, pretraining resumes from its last checkpoint, and a milestone already
released is not released again.

    python -m flows.recovery local-process     # what `rwkv5 up` runs, with PREFECT_API_URL set
"""

from __future__ import annotations

import sys

__all__ = ["reschedule_orphaned_runs"]


def reschedule_orphaned_runs(work_pool: str) -> list[str]:
    """Crash, then reschedule, every Running or Pending flow run of `work_pool`; returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed, Scheduled

    rescheduled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])),
        )
        for run in runs:
            # Crashed first, so the run's history shows what happened and its concurrency slot is released.
            client.set_flow_run_state(run.id, Crashed(message="its worker died; rescheduled by `rwkv5 up`"),
                                      force=True)
            client.set_flow_run_state(run.id, Scheduled(message="rescheduled after its worker died"), force=True)
            rescheduled.append(run.name)
    return rescheduled


def main() -> None:
    for name in reschedule_orphaned_runs(sys.argv[1]):
        print(name)


if __name__ == "__main__":
    main()
