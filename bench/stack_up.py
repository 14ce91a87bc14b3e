"""Seconds `rwkv5 up` takes to a usable stack (Ray head, Prefect and MLflow servers, worker, deployments), this
tree against another revision, in one run.

    python bench/stack_up.py [--against REV] [--repeats 2] [--out bench/results/stack-up-<host>.json]

Each repeat starts the stack of each tree in turn (a fresh state folder and free ports, `up` then `down`), in a
child process of its own, and times `up` and each of its steps: a service's start until it answers (and, for
Ray's head, has settled), the worker's Prefect setup, `prefect deploy`. `--against` is checked out into a
temporary git worktree, removed afterwards. Prints a table of medians and the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # after the script's folder; a child puts its tree first

from data_prep.atomic import atomic_write_text  # noqa: E402


def child(tree: Path) -> None:
    """Time one `up` of `tree`'s stack code (steps wrapped where it calls them), then `down`; one JSON line."""
    sys.path.insert(0, str(tree))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: `down` still runs
    import rwkv5_app.stack.supervisor as supervisor
    from bench.first_run import _free_port  # below the ephemeral range, where Ray picks its helper ports
    from rwkv5_app.stack.services import StackConfig

    t0 = time.monotonic()
    steps: list[dict] = []

    def timed(name: str):
        inner = getattr(supervisor, name)

        def wrapper(*args, **kwargs):
            began = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                what = args[1].name if name != "_prefect" else " ".join(args[2:4])
                steps.append({"step": what, "start_s": round(began - t0, 2),
                              "seconds": round(time.monotonic() - began, 2)})
        setattr(supervisor, name, wrapper)

    for name in ("_up_service", "_up_worker", "_prefect"):
        timed(name)
    cfg = StackConfig(state_dir=Path(tempfile.mkdtemp(prefix="stack-up-")), prefect_port=_free_port(),
                      mlflow_port=_free_port(), ray_port=_free_port(), ray_dashboard_port=_free_port(),
                      ray_client_port=_free_port(), gpus=0)
    try:
        states = supervisor.up(cfg, deploy=tree / "prefect.yaml")
        up_s = time.monotonic() - t0
    finally:
        supervisor.down(cfg)
    print(json.dumps({"up_s": round(up_s, 2), "states": states, "steps": steps}), flush=True)


def _run_child(tree: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(tree)], capture_output=True, text=True,
                          cwd=tree, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"stack_up child for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _revision(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision to compare with (checked out into a temporary worktree)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"stack-up-{platform.node()}.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    trees = {"this tree": REPO}
    scratch = None
    if args.against:
        scratch = Path(tempfile.mkdtemp(prefix="stack-up-against-")) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(scratch), args.against],
                       check=True, capture_output=True)
        trees[f"{args.against}"] = scratch
    try:
        runs: dict[str, list[dict]] = {label: [] for label in trees}
        for _ in range(args.repeats):
            for label, tree in trees.items():  # interleaved, so the machine's drift falls on both alike
                runs[label].append(_run_child(tree))
    finally:
        if scratch is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(scratch)], check=False)
    medians = {label: statistics.median(run["up_s"] for run in found) for label, found in runs.items()}
    base = medians[args.against] if args.against else None
    print(f"{'tree':<14} {'rwkv5 up (s, median)':>21} {'vs --against':>13}")
    for label, seconds in medians.items():
        ratio = f"{seconds / base:.2f}x" if base else "-"
        print(f"{label:<14} {seconds:>21.1f} {ratio:>13}")
    for label, found in runs.items():
        print(f"\n{label}, last repeat's steps (start s, seconds):")
        for step in found[-1]["steps"]:
            print(f"  {step['start_s']:6.1f}  {step['seconds']:6.1f}  {step['step']}")
    record = {
        "command": "python bench/stack_up.py " + " ".join(sys.argv[1:]),
        "host": platform.node(), "cpus": os.cpu_count(), "revision": _revision(REPO),
        "against": args.against, "repeats": args.repeats, "up_s_median": medians,
        "ratio": round(medians["this tree"] / base, 3) if base else None, "runs": runs,
    }
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
