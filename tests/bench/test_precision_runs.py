"""`bench/train_throughput.py --precision bf16 fp8`: which runs it makes, their arguments and the merged record
(the runs themselves need CUDA)."""

from __future__ import annotations

import json

import pytest

from bench.precision_runs import merge, run_labels, strip_options


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
