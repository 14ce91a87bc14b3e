"""The one-GPU pipeline record's pause breakdown (`bench.pipeline_1gpu.pause_breakdown`): which pretraining
segment and which milestone tasks each `shared`-mode pause is made of."""

from __future__ import annotations

import json
from pathlib import Path

from bench.pipeline_1gpu import PAUSE_PARTS, pause_breakdown

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
RECORD = RESULTS / "pipeline-1gpu-shared-h100-partial.json"


def _milestone(percent, created, start, durations):
    tasks, t = [], start
    for name, seconds in durations:
        tasks.append({"task": name, "state": "Completed", "start_s": t, "end_s": t + seconds})
        t += seconds
    return {"percent": percent, "created_s": created, "start_s": start, "end_s": t, "tasks": tasks}


def test_each_pause_is_the_segment_before_it_and_its_own_tasks():
    steps = [("fine-tune-a1", 50), ("evaluate-b2", 12), ("evaluate-c3", 5), ("log-evals-d4", 3), ("release-e5", 4)]
    prefect = {
        "pretrain": {"tasks": [
            {"task": "preflight-x", "start_s": 0, "end_s": 10},
            {"task": "pretrain-p1", "start_s": 10, "end_s": 100},  # cold: compiles
            {"task": "pretrain-p2", "start_s": 190, "end_s": 250},
            {"task": "pretrain-p3", "start_s": 340, "end_s": None},  # still running
        ]},
        "milestones": [_milestone(10, 100.5, 114, steps), _milestone(20, 250.2, 263, steps)],
    }
    found = pause_breakdown(prefect)
    first, second = found["rows"]
    assert (first["percent"], first["relaunch"], first["to_start"]) == (10, 90, 13.5)
    assert (second["percent"], second["relaunch"], second["to_start"]) == (20, 60, 12.8)
    assert (second["evaluate_base"], second["evaluate_finetune"]) == (12, 5)
    medians = found["median_after_the_first"]
    assert medians["relaunch"] == 60  # the cold first segment is left out
    assert medians["pause"] == 60 + 12.8 + 50 + 12 + 5 + 3 + 4


def test_the_session_14_record_splits_into_nine_pauses_of_about_155_s():
    found = pause_breakdown(json.loads(RECORD.read_text())["prefect"])
    assert [row["percent"] for row in found["rows"]] == list(range(10, 100, 10))
    assert all(row[part] is not None for row in found["rows"] for part in PAUSE_PARTS)
    assert found["rows"][0]["relaunch"] == max(row["relaunch"] for row in found["rows"])
    assert 140 < found["median_after_the_first"]["pause"] < 170


def test_the_session_15_record_splits_into_ten_pauses_and_its_own_medians():
    """The complete run: ten pauses, and the record's stored medians are what the function gives today."""
    record = json.loads((RESULTS / "pipeline-1gpu-shared-h100.json").read_text())
    found = pause_breakdown(record["prefect"])
    assert [row["percent"] for row in found["rows"]] == list(range(10, 110, 10))
    assert all(row[part] is not None for row in found["rows"] for part in PAUSE_PARTS)
    assert found == record["pauses"]
    assert found["median_after_the_first"]["pause"] < 100  # against ~155 s in session 14
