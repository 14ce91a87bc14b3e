"""`bench/train_throughput.py --precision bf16 fp8`: which runs it makes, their arguments and the merged record;
end to end on the CPU (tiny preset, emulated float8), and a failed child's traceback in the parent's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.precision_runs import merge, run_labels, strip_options
from bench.record import ROOT


def _throughput(*args: str) -> subprocess.CompletedProcess:
    """`bench/train_throughput.py` on the CPU (no GPU visible), as the device script runs it."""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench/train_throughput.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_one_bf16_run_and_one_fp8_run_per_recipe():
    assert run_labels(["bf16", "fp8"], ["tensorwise"]) == [("bf16", "bf16", "tensorwise"),
                                                          ("fp8", "fp8", "tensorwise")]
    assert [r[0] for r in run_labels(["bf16", "fp8"], ["tensorwise", "rowwise"])] == [
        "bf16", "fp8-tensorwise", "fp8-rowwise"]


def test_children_get_the_same_arguments_but_their_own_precision_and_output():
    argv = ["--preset", "7b", "--precision", "bf16", "fp8", "--layers", "8", "--fp8-recipe=rowwise",
            "--out", "x.json", "--steps", "4"]
    assert strip_options(argv) == ["--preset", "7b", "--layers", "8", "--steps", "4"]


def test_fp8_speedup_is_the_tokens_per_second_ratio():
    def rec(precision, recipe, tps):
        return {"precision": precision, "fp8_recipe": recipe, "tokens_per_s_per_gpu": tps, "mfu": None,
                "step_time_s": 1.0, "peak_memory_gb": 1.0}

    merged = merge({"bf16": rec("bf16", None, 100.0), "fp8-tensorwise": rec("fp8", "tensorwise", 140.0),
                    "fp8-rowwise": rec("fp8", "rowwise", 120.0)}, "cmd")
    assert merged["fp8_speedup"] == pytest.approx(1.4)
    assert merged["fp8_speedup_by_recipe"] == pytest.approx({"tensorwise": 1.4, "rowwise": 1.2})
    assert merged["precision"] == ["bf16", "fp8-tensorwise", "fp8-rowwise"]
    json.dumps(merged)


def test_one_child_run_per_precision_and_recipe_end_to_end(tmp_path):
    """bf16, fp8 tensorwise and fp8 rowwise as `bench/fp8_device.sh` runs them, at the tiny preset: one record,
    each run's precision in it, and no run leaves a checkpoint behind (at 7b width ~32 GB each: the cause of
    issue 28's failed child runs)."""
    out = tmp_path / "fp8.json"
    done = _throughput("--preset", "tiny", "--steps", "2", "--warmup", "1", "--grad-accum", "1", "--workdir",
                       str(tmp_path), "--precision", "bf16", "fp8", "--fp8-recipe", "tensorwise", "rowwise",
                       "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["precision"] == ["bf16", "fp8-tensorwise", "fp8-rowwise"] and record["failed"] == {}
    assert {label: (run["precision"], run["fp8_recipe"]) for label, run in record["runs"].items()} == {
        "bf16": ("bf16", None), "fp8-tensorwise": ("fp8", "tensorwise"), "fp8-rowwise": ("fp8", "rowwise")}
    assert record["fp8_speedup"] > 0 and set(record["fp8_speedup_by_recipe"]) == {"tensorwise", "rowwise"}
    assert record["fp8_speedup"] == pytest.approx(record["fp8_speedup_by_recipe"]["tensorwise"])
    assert all(run["steps_measured"] == 1 and run["gpu"] == "cpu" for run in record["runs"].values())
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob(".partial-*"))


def test_a_failed_child_run_prints_its_traceback(tmp_path):
    """A child that dies (here: a config error the parent's parser does not check) is reported with the end of
    its stderr, unfiltered, and the parent exits non-zero."""
    done = _throughput("--preset", "tiny", "--layers", "-1", "--workdir", str(tmp_path), "--precision", "bf16",
                       "--fp8-recipe", "tensorwise", "rowwise", "--out", str(tmp_path / "x.json"))
    assert done.returncode != 0 and "no run finished: bf16 failed" in done.stderr
    block = done.stdout.split("== bf16 failed (exit 1); the last ", 1)[1].split("== end of bf16's stderr")[0]
    assert "Traceback (most recent call last)" in block and "model.n_layer must be > 0, got -1" in block
    assert not (tmp_path / "x.json").exists()
