"""Where the fixed seconds of one Ray Train launch go (issue 25: a `shared`-mode pause is two of them).

    python bench/pause_overhead.py [--repeats 3] [--env KEY=VALUE ...] [--out bench/results/pause-overhead-cpu.json]

Runs the milestone flow's fine-tune (`finetune_milestone`, tiny preset, five steps, one Ray Train worker on the
CPU, MLflow into a local store with system metrics on) `--repeats` times on one local Ray started with the
stack's environment (`SERVICE_ENV`) plus `--env`, after one unrecorded warm-up, and splits each launch by the
timestamps of the driver, the Ray Train controller's log and a stamping callback in the worker:

- `controller_start`: `fit()` called -> the controller's first log line (actor process, imports, storage checks);
- `worker_actors`, `train_context`: the controller's own "[Worker Group Initialization]" figures;
- `to_train_fn`: the rest of the worker group start (process group, callbacks);
- `worker_setup`: train function launched -> first step begins (DeepSpeed import and initialize, model,
  base weights, data, MLflow run start), split further by the worker's stamps;
- `steps_and_save`: first step -> the callbacks' close (steps, checkpoint, milestone export);
- `close`: the callbacks' close (MLflow end, system-metrics stop) itself;
- `shutdown`: close done -> `fit()` returns (controller poll, worker group shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv5.train.callbacks import Callback  # noqa: E402


class Stamps(Callback):
    """Times (epoch s) of the worker's phases, appended as one JSON line to `path` at close."""

    def __init__(self, path: str):
        self.path, self.t = path, {}

    def __setstate__(self, state):  # unpickled in the worker: the train context is being set up
        self.__dict__.update(state)
        self.t = {"unpickled": time.time()}
        _patch_worker(self.t)

    def pre_train(self, ctx) -> None:
        import psutil

        self.t["process_born"] = psutil.Process().create_time()
        self.t["pre_train"] = time.time()

    def post_step(self, info, metrics) -> None:
        self.t.setdefault("first_step_done", time.time())

    def close(self) -> None:
        self.t["close"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(self.t) + "\n")


def _patch_worker(t: dict) -> None:
    """Wrap the worker's setup calls so that each records when it ended (bench only)."""
    import rwkv5.tracking as tracking
    import rwkv5.train.worker as worker

    def stamp(owner, name, key):
        original = getattr(owner, name)

        def wrapped(*a, **kw):
            t.setdefault(key + "_start", time.time())
            out = original(*a, **kw)
            t[key] = time.time()
            return out

        setattr(owner, name, wrapped)

    stamp(worker, "_setup_distributed", "setup_distributed")
    stamp(worker, "plan_resume", "init_model_and_plan")
    stamp(worker, "build_optimizer", "build_optimizer")
    stamp(worker, "load_engine_state", "load_checkpoint")
    stamp(tracking.MLflowCallback, "pre_train", "mlflow_start")
    stamp(tracking.MLflowCallback, "close", "mlflow_end")
    import rwkv5.train.finetune as finetune

    stamp(finetune.FinetuneTask, "batches", "chat_batches")
    real_import = worker.import_deepspeed

    def import_deepspeed():  # DeepSpeed's own import stays where the worker does it
        ds = real_import()
        if not getattr(ds.initialize, "stamped", False):
            stamp(ds, "initialize", "ds_initialize")
            ds.initialize.stamped = True
        return ds

    worker.import_deepspeed = import_deepspeed


def _controller_lines(session: Path, since: float) -> list[tuple[float, str]]:
    """The log of the controller that started after `since` (one launch = one controller actor)."""
    for path in sorted((session / "logs" / "train").glob("ray-train-sys-controller-*.log")):
        rows = []
        for line in path.read_text().splitlines():
            d = json.loads(line)
            rows.append((datetime.strptime(d["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp(), d["message"]))
        if rows and rows[0][0] >= since:
            return rows
    raise RuntimeError(f"no controller log after {since}")


def _phases(t_fit: float, t_done: float, ctl: list[tuple[float, str]], w: dict) -> dict:
    first = ctl[0][0]
    grab = {k: next(float(m.group(1)) for _, line in ctl if (m := re.search(pat + r".*? in ([\d.]+)s", line)))
            for k, pat in (("worker_actors", "worker actors created"), ("train_context", "Train context initialized"),
                           ("worker_group_total", "Worker group startup completed"))}
    launched = next(t for t, line in ctl if "Started training worker group" in line)
    attempt = next(t for t, line in ctl if "Attempting to start training worker group" in line)
    out = {"controller_start": first - t_fit, "resources_to_start": attempt - first, **grab,
           "to_train_fn": launched - attempt - grab["worker_actors"] - grab["train_context"],
           "worker_setup": w["first_step_done"] - launched, "steps_and_save": w["close"] - w["first_step_done"],
           "shutdown": t_done - w["close"], "total": t_done - t_fit}
    order = ["setup_distributed", "init_model_and_plan", "build_optimizer", "ds_initialize", "load_checkpoint",
             "chat_batches", "mlflow_start", "pre_train"]
    prev = launched
    for key in order:
        if key in w:
            out[f"w.{key}"] = w[key] - prev
            prev = w[key]
    out["w.mlflow_end"] = w.get("mlflow_end", w["close"]) - w.get("mlflow_end_start", w["close"])
    out["worker_process_age_at_launch"] = launched - w["process_born"]
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE set for Ray and the driver")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import ray
    import torch

    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.config import model_preset
    from rwkv5.model import RWKV5
    from rwkv5.train.finetune import finetune_milestone
    from rwkv5_app.stack.services import SERVICE_ENV

    work = Path(tempfile.mkdtemp(prefix="pause-overhead-"))
    extra = dict(kv.split("=", 1) for kv in args.env)
    os.environ.update(SERVICE_ENV | extra | {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
                                            "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
                                            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "10"})
    base = str(save_checkpoint(RWKV5(model_preset("tiny")).to(torch.bfloat16), work / "base.safetensors"))
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    stamps = work / "stamps.jsonl"
    from unittest import mock

    import rwkv5.train.finetune as ft

    rows = []
    for i in range(args.repeats + 1):
        real = ft.finetune

        def with_stamps(*a, callbacks=(), **kw):
            return real(*a, callbacks=[*callbacks, Stamps(str(stamps))], **kw)

        with mock.patch.object(ft, "finetune", with_stamps):
            t0 = time.time()
            finetune_milestone(base, work / "runs", f"ft-{i}", steps=5, workers=1, gpus_per_worker=0)
            t1 = time.time()
        w = json.loads(stamps.read_text().splitlines()[-1])
        phases = _phases(t0, t1, _controller_lines(session, t0 - 0.5), w)
        print(("warm-up " if i == 0 else f"run {i} ") + json.dumps(phases), flush=True)
        if i:
            rows.append(phases)
    ray.shutdown()
    median = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    print("median " + json.dumps(median))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": extra, "cpus": os.cpu_count(),
                                        "torch": torch.__version__, "ray": ray.__version__, "runs": rows,
                                        "median": median}, indent=1))


if __name__ == "__main__":
    main()
