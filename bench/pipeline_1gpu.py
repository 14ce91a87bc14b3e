"""The whole pipeline on one GPU: `rwkv5 up`, `prefect deployment run pretrain/1gpu`, and what came of it.

    python bench/pipeline_1gpu.py --out bench/results/pipeline-1gpu-h100.json [--deadline-s 430] [--keep]

Starts the local stack (its default ports, state in $RWKV5_HOME), runs the deployment as a person types it,
waits for the pretrain flow run and its ten milestone runs (or the deadline), then reads back:
- from the Prefect API, every flow run's final state and task runs, and the order the milestone runs ran in;
- from MLflow, the pretraining run's tokens/s, MFU and WKV backend, the fine-tune runs and the milestone evals;
- from the state folder, the milestone table and each release's manifest.
Writes them to one JSON (whatever finished by the deadline, or when the process gets SIGUSR1: a partial run
is recorded as such) and prints a summary. bench/pipeline_1gpu.sh is the device call around it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEPLOYMENT = "pretrain/1gpu"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deployment_parameters(deployment: str) -> dict:
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return next(d["parameters"] for d in spec["deployments"] if d["name"] == deployment.split("/")[1])


def _flow_runs(client, run_name: str, pretrain_id: str) -> tuple:
    """The pretrain flow run and the milestone flow runs of `run_name`, oldest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    pretrain = client.read_flow_run(pretrain_id)
    milestones = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["milestone"])), limit=200)
    milestones = sorted((r for r in milestones if r.parameters.get("run") == run_name), key=lambda r: r.created)
    return pretrain, milestones


def _finished(pretrain, milestones) -> bool:
    if pretrain.state_type.value not in FINAL:
        return False
    percents = {r.parameters.get("percent") for r in milestones}
    settled = all(r.state_type.value in FINAL for r in milestones)
    failed = pretrain.state_type.value != "COMPLETED"
    return settled and (len(percents) >= 10 or failed)


def _wait(api_url: str, run_name: str, pretrain_id: str, deadline: float) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    last_report = 0.0
    asked = []  # SIGUSR1: record now (the device time is about to end)
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(True))
    with SyncPrefectClient(api_url) as client:
        while time.monotonic() < deadline and not asked:
            pretrain, milestones = _flow_runs(client, run_name, pretrain_id)
            if _finished(pretrain, milestones):
                return
            if time.monotonic() - last_report > 20:
                done = sum(r.state_type.value == "COMPLETED" for r in milestones)
                print(f"  pretrain {pretrain.state_name}; milestone runs {len(milestones)}, {done} completed",
                      flush=True)
                last_report = time.monotonic()
            time.sleep(3)
    print(f"  {'asked' if asked else 'deadline reached'}: recording what finished", flush=True)


def _run_record(client, run, t0) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def rel(t):
        return round((t - t0).total_seconds(), 1) if t else None

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {
        "name": run.name, "id": str(run.id), "state": run.state_name, "percent": run.parameters.get("percent"),
        "created_s": rel(run.created), "start_s": rel(run.start_time), "end_s": rel(run.end_time),
        "tasks": [{"task": t.name, "state": t.state_name, "start_s": rel(t.start_time), "end_s": rel(t.end_time)}
                  for t in sorted(tasks, key=lambda t: (t.start_time is None, t.start_time or t.created))],
    }


def _prefect_record(api_url: str, run_name: str, pretrain_id: str) -> dict:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        pretrain, milestones = _flow_runs(client, run_name, pretrain_id)
        t0 = pretrain.created
        started = sorted((r for r in milestones if r.start_time), key=lambda r: r.start_time)
        return {
            "pretrain": _run_record(client, pretrain, t0),
            "milestones": [_run_record(client, r, t0) for r in milestones],
            "milestone_percents_in_start_order": [r.parameters.get("percent") for r in started],
            "milestone_runs_completed": sum(r.state_type.value == "COMPLETED" for r in milestones),
        }


def _summary(history) -> dict:
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    if not values:
        return {}
    later = values[len(values) // 2:]  # past compilation and the first milestones' start-up
    return {"steps": len(values), "first": values[0], "last": values[-1], "max": max(values),
            "median": statistics.median(values), "median_second_half": statistics.median(later)}


def _mlflow_record(tracking_uri: str, run_name: str) -> dict:
    import mlflow

    from rwkv5.tracking import RUN_TAG

    client = mlflow.MlflowClient(tracking_uri)
    record: dict = {}
    pretrain_exp = client.get_experiment_by_name("rwkv5-pretrain")
    runs = client.search_runs([pretrain_exp.experiment_id], f"tags.`{RUN_TAG}` = '{run_name}'") if pretrain_exp else []
    if runs:
        run = runs[0]
        record["pretrain"] = {
            "run_id": run.info.run_id, "status": run.info.status,
            "params": {k: run.data.params.get(k) for k in ("wkv_backend", "world_size", "preset", "compile",
                                                           "activation_memory", "batch.micro_batch",
                                                           "batch.global_batch", "batch.ctx_len")},
            "metrics": {name: _summary(client.get_metric_history(run.info.run_id, name))
                        for name in ("tokens_per_s", "mfu", "loss", "step_time_s", "gpu_mem_gb")},
        }
    finetune_exp = client.get_experiment_by_name("rwkv5-finetune")
    if finetune_exp:
        ft = client.search_runs([finetune_exp.experiment_id], max_results=100)
        record["finetunes"] = sorted(({"run": r.info.run_name, "status": r.info.status,
                                       "wkv_backend": r.data.params.get("wkv_backend"),
                                       "tokens_per_s_last": r.data.metrics.get("tokens_per_s")} for r in ft),
                                     key=lambda r: r["run"] or "")
    milestone_exp = client.get_experiment_by_name("rwkv5-milestones")
    if milestone_exp:
        ms = client.search_runs([milestone_exp.experiment_id], max_results=100)
        record["milestone_evals"] = sorted(({"run": r.info.run_name, "metrics": r.data.metrics} for r in ms),
                                           key=lambda r: r["run"] or "")
    return record


def _releases(layout, run_name: str) -> list[dict]:
    from rwkv5.release.publish import read_manifest
    from rwkv5.release.targets import LocalTarget

    root = layout.releases(run_name)
    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        manifest = read_manifest(LocalTarget(folder))
        entry = {"release": str(folder), "manifest": manifest is not None}
        if manifest is not None:
            entry["name"] = manifest["name"]
            entry["files"] = {f["path"]: f["bytes"] for f in manifest["files"]}
            entry["evals"] = {variant: v["evals"] for variant, v in manifest["variants"].items()}
        found.append(entry)
    return found


def _preflight_rows(api_url: str, run_name: str) -> list[dict]:
    """The preflight table: each check's result, detail and seconds (the CUDA kernel's says whether the run
    waited for the build started beside `rwkv5 up`)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.paths import artifact_key

    with SyncPrefectClient(api_url) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("preflight", run_name)])))
    return (json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data) if found else []


def _beside(record: dict, other: Path) -> dict:
    """Pretraining tokens/s of this run next to an earlier record's (a ratio; cards named, since only the same
    card compares)."""
    if not other.is_file():
        return {}
    before = json.loads(other.read_text())
    now = record["mlflow"].get("pretrain", {}).get("metrics", {}).get("tokens_per_s", {})
    then = before.get("mlflow", {}).get("pretrain", {}).get("metrics", {}).get("tokens_per_s", {})
    if not now.get("median") or not then.get("median"):
        return {}
    return {"record": str(other.relative_to(REPO)), "gpu": before.get("environment", {}).get("gpu"),
            "gpus_per_worker": before.get("parameters", {}).get("gpus_per_worker"),
            "tokens_per_s_median": then["median"], "this_run_tokens_per_s_median": now["median"],
            "ratio": round(now["median"] / then["median"], 3)}


PAUSE_PARTS = ("relaunch", "to_start", "fine_tune", "evaluate_base", "evaluate_finetune", "log_evals", "release")


def pause_breakdown(prefect: dict) -> dict:
    """Where each `shared`-mode pause went, from the record's task timings (seconds from the pretrain flow run's
    creation): the pretraining segment that ended at the milestone (`relaunch`: its whole task, start-up to
    export), the milestone flow run's start (`to_start`: creation to running), then its tasks. Returns a row per
    milestone run and the medians."""
    pretrain_tasks = sorted((t for t in prefect["pretrain"]["tasks"] if t["task"].startswith("pretrain-")
                             and t.get("end_s") is not None), key=lambda t: t["end_s"])
    rows = []
    for run in prefect["milestones"]:
        tasks = {}
        for task in run["tasks"]:
            if task.get("end_s") is None:
                continue
            kind = task["task"].rsplit("-", 1)[0].replace("-", "_")
            if kind == "evaluate":
                kind = "evaluate_finetune" if "evaluate_base" in tasks else "evaluate_base"
            tasks[kind] = round(task["end_s"] - task["start_s"], 1)
        segment = [t for t in pretrain_tasks if t["end_s"] <= run["created_s"] + 1.0]
        row = {"percent": run["percent"],
               "relaunch": round(segment[-1]["end_s"] - segment[-1]["start_s"], 1) if segment else None,
               "to_start": round(run["start_s"] - run["created_s"], 1) if run.get("start_s") is not None else None,
               **{part: tasks.get(part) for part in PAUSE_PARTS[2:]}}
        rows.append(row)
    medians = {}
    for part in PAUSE_PARTS:
        values = [row[part] for row in rows[1:] if row[part] is not None]  # the first segment compiles from cold
        medians[part] = round(statistics.median(values), 1) if values else None
    medians["pause"] = round(sum(v for v in medians.values() if v is not None), 1)
    return {"rows": rows, "median_after_the_first": medians}


def _complete(record: dict) -> bool:
    """The pretrain flow run and ten milestone runs Completed, ten releases with manifests."""
    p = record["prefect"]
    return (p["pretrain"]["state"] == "Completed" and p["milestone_runs_completed"] >= 10
            and sum(r["manifest"] for r in record["releases"]) >= 10)


def _environment() -> dict:
    import torch

    versions = {}
    for name in ("torch", "deepspeed", "ray", "prefect", "mlflow", "triton"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cuda": torch.version.cuda, "python": platform.python_version(), "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=430.0,
                        help="stop waiting this long after `prefect deployment run` and record what finished")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument("--deployment", default=DEPLOYMENT, help="another pretrain deployment (a CPU rehearsal)")
    parser.add_argument("--beside", type=Path, default=REPO / "bench/results/pipeline-1gpu-h100.json",
                        help="an earlier record whose pretraining tokens/s this run's is set beside")
    args = parser.parse_args()
    from data_prep.atomic import atomic_write_text
    from flows.paths import Layout
    from rwkv5.release.milestones import MilestoneTable
    from rwkv5_app.stack import StackConfig, down, up

    cfg = StackConfig()
    parameters = _deployment_parameters(args.deployment)
    run_name = parameters["run_name"]
    t = time.monotonic()
    up(cfg, deploy=REPO / "prefect.yaml")
    timings = {"rwkv5_up_s": round(time.monotonic() - t, 1)}
    print(f"rwkv5 up: {timings['rwkv5_up_s']} s", flush=True)
    try:
        env = {**os.environ, **cfg.env()}
        t = time.monotonic()
        typed = subprocess.run(["prefect", "deployment", "run", args.deployment], env=env, cwd=REPO,
                               capture_output=True, text=True, check=True)
        pretrain_id = re.search(r"UUID:\s*([0-9a-f-]{36})", typed.stdout).group(1)
        print(f"prefect deployment run {args.deployment}: flow run {pretrain_id}", flush=True)
        _wait(cfg.prefect_api_url, run_name, pretrain_id, t + args.deadline_s)
        timings["waited_s"] = round(time.monotonic() - t, 1)
        layout = Layout.default(str(cfg.state_dir))
        preflight = _preflight_rows(cfg.prefect_api_url, run_name)
        record = {
            "command": f"prefect deployment run {args.deployment} (bench/pipeline_1gpu.py, after rwkv5 up)",
            "deployment": args.deployment, "parameters": parameters,
            "environment": _environment(),
            "timings": timings,
            "prefect": _prefect_record(cfg.prefect_api_url, run_name, pretrain_id),
            "mlflow": _mlflow_record(cfg.mlflow_url, run_name),
            "milestone_table": MilestoneTable(layout.milestone_results(run_name)).rows(),
            "releases": _releases(layout, run_name),
            "milestone_mode": next((row for row in preflight if row.get("check") == "milestones"), {}),
            "preflight": preflight,
        }
        record = {"complete": _complete(record), **record, "beside": _beside(record, args.beside),
                  "pauses": pause_breakdown(record["prefect"])}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1, default=str))
        p, m = record["prefect"], record["mlflow"].get("pretrain", {})
        print(f"pretrain flow run: {p['pretrain']['state']}; milestone runs completed: "
              f"{p['milestone_runs_completed']} in order {p['milestone_percents_in_start_order']}")
        print(f"releases with manifest: {sum(r['manifest'] for r in record['releases'])}; "
              f"wkv_backend: {m.get('params', {}).get('wkv_backend')}; "
              f"tokens/s: {m.get('metrics', {}).get('tokens_per_s')}; mfu: {m.get('metrics', {}).get('mfu')}")
        print(f"one pause, medians after the first (s): {record['pauses']['median_after_the_first']}")
        print(f"milestones: {record['milestone_mode'].get('detail')}; complete: {record['complete']}; "
              f"beside: {record['beside']}")
        print(f"wrote {args.out}")
    finally:
        if not args.keep:
            down(cfg)


if __name__ == "__main__":
    main()
