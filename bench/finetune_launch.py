"""What one milestone fine-tune through Ray Train costs, and which Ray settings shorten it.

    python bench/finetune_launch.py --out bench/results/finetune-launch-<card>.json [--preset 169m] [--gpus 0.5]

The milestone runs of `pretrain/1gpu` take ~40 s each, ~31 s of it the fine-tune, though its five steps train
for ~2 s (bench/NOTES.md, "The pipeline on one GPU"). This runs `finetune_milestone` (the milestone flow's
fine-tune: a base checkpoint, five chat SFT steps, one Ray Train worker) under each Ray setting below, each on
a Ray cluster of its own started with that setting, in the order A B C A (the repeat shows drift), after
one unrecorded warm-up (DeepSpeed's FusedAdam build). Prints a table of wall seconds and ratios to the first A;
writes the JSON.

- A `stack`: the environment `rwkv5 up` gives Ray (rwkv5_app.stack.services.SERVICE_ENV);
- B `no-train-metrics`: A and RAY_TRAIN_METRICS_ENABLED=0 (Ray Train's Prometheus hooks);
- C `prestart`: B with Ray's worker prestart on (idle workers started ahead of tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "stack": {},
    "no-train-metrics": {"RAY_TRAIN_METRICS_ENABLED": "0"},
    "prestart": {"RAY_TRAIN_METRICS_ENABLED": "0", "RAY_enable_worker_prestart": "1",
                 "RAY_prestart_worker_first_driver": "1"},
}


def _one_finetune(base: str, storage: Path, name: str, gpus: float, variant: dict) -> float:
    """Wall seconds of one milestone fine-tune on a fresh Ray cluster started with `variant` set."""
    import ray

    from rwkv5_app.stack.services import SERVICE_ENV
    from rwkv5.train.finetune import finetune_milestone

    with mock.patch.dict(os.environ, {**SERVICE_ENV, **variant}):
        ray.init(include_dashboard=False, log_to_driver=False)  # its processes inherit the variant's settings
        try:
            start = time.perf_counter()
            finetune_milestone(base, storage, name, steps=5, workers=1, gpus_per_worker=gpus)
            return time.perf_counter() - start
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="169m")
    parser.add_argument("--gpus", type=float, default=0.5, help="gpus_per_worker (0: CPU)")
    args = parser.parse_args()
    import torch

    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.config import model_preset
    from rwkv5.model import RWKV5

    work = Path(tempfile.mkdtemp(prefix="ft-launch-"))
    base = str(save_checkpoint(RWKV5(model_preset(args.preset)).to(torch.bfloat16), work / "base.safetensors"))
    _one_finetune(base, work / "runs", "warmup", args.gpus, VARIANTS["stack"])
    order = ["stack", "no-train-metrics", "prestart", "stack"]
    rows = []
    for i, name in enumerate(order):
        seconds = _one_finetune(base, work / "runs", f"ft-{i}-{name}", args.gpus, VARIANTS[name])
        rows.append({"variant": name, "env": VARIANTS[name], "seconds": round(seconds, 2)})
    first = rows[0]["seconds"]
    print("| variant | s | ratio to first stack |\n|---|---|---|")
    for row in rows:
        row["ratio"] = round(row["seconds"] / first, 3)
        print(f"| {row['variant']} | {row['seconds']:.1f} | {row['ratio']:.3f} |")
    record = {"command": " ".join(sys.argv), "preset": args.preset, "gpus_per_worker": args.gpus,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
