"""bench/zero_overhead.py through the real train() (DeepSpeed ZeRO-2 bf16 on gloo): the project's config runs
fewer gradient copies and elementwise ops per micro-batch than DeepSpeed's defaults on the same model, and never
synchronizes the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.record import ROOT


def test_project_zero_config_copies_less_than_deepspeeds_default(tmp_path):
    # In a child process: train() leaves a process group and its rendezvous variables in the process it runs in.
    out = tmp_path / "zero.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(ROOT / "bench/zero_overhead.py"), "--ranks", "1", "--grad-accum", "2",
                           "--no-profiler", "--configs", "project", "deepspeed_default", "--out", str(out)],
                          cwd=ROOT, env=env | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours, theirs = (row["per_micro_batch_mean"] for row in json.loads(out.read_text())["worlds"]["1"][0])
    assert ours["copies"] < theirs["copies"], (ours, theirs)
    assert ours["copy_bytes"] < theirs["copy_bytes"]
    # DeepSpeed's reduce_scatter divides each bucket by the world size, 1 here: the project skips it.
    assert ours.get("op:div_", 0) == 0 < theirs["op:div_"]
    assert ours["elementwise"] < theirs["elementwise"]
    # DeepSpeed's throughput timer synchronizes in every forward and step; the project's config turns it off.
    assert ours["device_syncs"] == 0 < theirs["device_syncs"]
