"""Time the README's first run: `rwkv5 up`, then `prefect deployment run pretrain/tiny --watch`, broken down.

    python bench/first_run.py [--state DIR] [--keep]

Starts a stack of its own (a fresh state folder, free ports, so a running `rwkv5 up` is not touched), runs the
tiny deployment as a person types it, waits for the ten milestone runs and the long-context run that the
last release starts, and then reads the flow runs and task runs back from the Prefect API: the pretrain flow's
stages and every milestone run's and the long-context run's phases (from its creation to its process start, the
first task's start, fine-tune, the evaluations, release). Prints one markdown table (bench/NOTES.md,
"First run") with the load average before and after, and the time from the pretrain run's creation to the
long-context release (the README's 8-minute goal).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up): the Ray head picks its own helper ports (metrics,
    agents) at random from that range, and one of them could take an MLflow or Prefect port picked there before
    that service binds it (seen once: MLflow's URL answered with Ray's metrics)."""
    for port in random.Random().sample(range(20000, 32000), 500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def _longctx_end_s(cfg) -> float | None:
    """Seconds from the first flow run's creation (the pretrain run's) to the long-context run's end, or None."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(cfg.prefect_api_url) as client:
        runs = client.read_flow_runs(limit=200)
        flows = {f.id: f.name for f in client.read_flows()}
    ends = [r.end_time for r in runs if flows.get(r.flow_id) == "longctx" and r.end_time]
    return (ends[0] - min(r.created for r in runs)).total_seconds() if ends else None


def _table(cfg) -> list[str]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    with SyncPrefectClient(cfg.prefect_api_url) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
        flows = {f.id: f.name for f in client.read_flows()}
        t0 = min(r.created for r in runs)

        def rel(t) -> str:
            return f"{(t - t0).total_seconds():.0f}" if t else "-"

        rows.append("| flow run | created | start | end | total s | phases (s) |")
        rows.append("|---|---|---|---|---|---|")
        for run in sorted(runs, key=lambda r: r.created):
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            tasks = sorted((t for t in tasks if t.start_time), key=lambda t: t.start_time)
            phases = []
            if tasks and run.start_time:
                phases.append(f"start->first task {(tasks[0].start_time - run.start_time).total_seconds():.1f}")
            for t in tasks:
                end = t.end_time or t.start_time
                phases.append(f"{t.name.rsplit('-', 1)[0]} "
                              f"{(end - t.start_time).total_seconds():.1f}")
            total = (run.end_time - run.start_time).total_seconds() if run.end_time and run.start_time else None
            name = flows.get(run.flow_id, "?")
            label = name if name != "milestone" else f"milestone {run.parameters.get('percent')}%"
            rows.append(f"| {label} | {rel(run.created)} | {rel(run.start_time)} | {rel(run.end_time)} | "
                        f"{total:.0f} | {'; '.join(phases)} |" if total is not None else
                        f"| {label} | {rel(run.created)} | - | - | - | {run.state_name} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    from rwkv5_app.stack import StackConfig, down, up

    state = args.state or Path(tempfile.mkdtemp(prefix="rwkv5-first-run-"))
    cfg = StackConfig(state_dir=state, prefect_port=_free_port(), mlflow_port=_free_port(), ray_port=_free_port(),
                      ray_dashboard_port=_free_port(), ray_client_port=_free_port())
    print(f"state {state}; load before {_load()}", flush=True)
    t = time.monotonic()
    up(cfg, deploy=REPO / "prefect.yaml")
    t_up = time.monotonic() - t
    print(f"rwkv5 up: {t_up:.0f} s", flush=True)
    try:
        env = {**os.environ, **cfg.env()}
        t = time.monotonic()
        done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", "pretrain/tiny",
                               "--watch", "--watch-timeout", "3000"], env=env, cwd=REPO)
        t_run = time.monotonic() - t
        # --watch returns when the pretrain flow run ends; the milestone runs may still be going.
        from flows.paths import Layout
        results = Layout.default(str(state)).milestone_results("tiny-demo")
        while True:
            rows = _table(cfg)
            milestones = sum(r.startswith("| milestone ") for r in rows)
            longctx = any(r.startswith("| longctx ") for r in rows)
            if milestones >= 10 and longctx and not any("| - |" in r for r in rows[2:]):
                break
            time.sleep(5)
        t_all = time.monotonic() - t
        print(f"\n`prefect deployment run pretrain/tiny --watch`: exit {done.returncode}, {t_run:.0f} s; "
              f"all milestone runs and the long-context run done after {t_all:.0f} s; long-context release "
              f"{_longctx_end_s(cfg):.0f} s after the pretrain run was created; load after {_load()}; "
              f"results {results}")
        print("\n".join(rows))
        import json
        import statistics
        times = [json.loads(line)["time"] for line in open(state / "checkpoints" / "tiny-demo" / "trace.jsonl")]
        steps = [b - a for a, b in zip(times, times[1:])]
        print(f"pretraining: {len(times)} steps, step time median {statistics.median(steps):.2f} s, "
              f"min {min(steps):.2f} s, max {max(steps):.2f} s")
    finally:
        if not args.keep:
            down(cfg)


if __name__ == "__main__":
    main()
