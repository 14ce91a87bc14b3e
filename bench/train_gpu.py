"""Pretraining throughput on one GPU: the same `rwkv5.train.worker.train` as under Ray, launched without Ray.

    python3 bench/train_gpu.py --preset 169m --steps 50 --out bench/results/train-169m-h200.json

Writes a synthetic token dataset (arithmetic sequences, so the loss visibly falls), trains `--steps` optimizer
steps of the run preset (ZeRO-2 bf16, FusedAdam, NCCL with one rank, the CUDA WKV kernel when it loads) and
records per-step loss, tokens/s and MFU; the summary skips the first 5 steps (kernel builds, allocator warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv5.train.callbacks import Callback  # noqa: E402
from rwkv5.train.config import run_preset, with_overrides  # noqa: E402
from rwkv5.train.worker import TrainJob, train  # noqa: E402


class _Record(Callback):
    def __init__(self):
        self.rows = []

    def log_metrics(self, step, metrics):
        self.rows.append({"step": step} | {k: float(v) for k, v in metrics.items()})


def _documents(tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    written = 0
    while written < tokens:
        start, step, length = rng.integers(1, 60000), rng.integers(1, 7), rng.integers(500, 8000)
        doc = (start + step * np.arange(length)) % 65000 + 1
        written += length + 1
        yield np.append(doc, 0).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="169m")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="bench/results/train-169m-h200.json")
    args = ap.parse_args()

    from data_prep.shards import write_token_dataset

    from rwkv5.wkv import default_backend

    cfg = run_preset(args.preset)
    cfg = with_overrides(cfg, {"token_budget": args.steps * cfg.tokens_per_step, "checkpoint.every_steps": 10**6,
                               "milestones.fraction": 1.0, "metrics.system_metrics": False})
    work = Path(tempfile.mkdtemp(prefix="rwkv5-bench-"))
    t0 = time.time()
    write_token_dataset(work / "data", _documents(cfg.tokens_per_step * (args.steps + 2)), "synthetic-bench",
                        shard_tokens=50_000_000)
    print(f"data: {time.time() - t0:.1f} s", flush=True)
    record = _Record()
    job = TrainJob(cfg, f"bench-{args.preset}", str(work / "data"), str(work / "runs"), callbacks=[record])
    t0 = time.time()
    train(job)
    wall = time.time() - t0
    steady = record.rows[5:]
    import deepspeed

    result = {
        "command": "python3 bench/train_gpu.py " + " ".join(sys.argv[1:]),
        "preset": args.preset,
        "model": cfg.model.model_dump(),
        "batch": cfg.batch.model_dump(),
        "activation_memory": cfg.activation_memory, "compile": cfg.compile,
        "steps": len(record.rows),
        "wkv_backend": default_backend("cuda"),
        "optimizer": "FusedAdam (DeepSpeed, guarded), ZeRO-2, bf16",
        "distributed": "NCCL, 1 rank",
        "gpu": torch.cuda.get_device_name(0),
        "peak_flops": cfg.metrics.peak_flops,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "loss_first": record.rows[0]["loss"],
        "loss_last": record.rows[-1]["loss"],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu_median": statistics.median(r["mfu"] for r in steady),
        "step_time_s_median": statistics.median(r["step_time_s"] for r in steady),
        "gpu_mem_gb_max": max(r.get("gpu_mem_gb", 0.0) for r in record.rows),
        "wall_s": wall,
        "per_step": [{k: r[k] for k in ("step", "loss", "tokens_per_s", "mfu", "grad_norm") if k in r}
                     for r in record.rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
