"""`train_here`: the one-process run the CPU demo's pretrain stage uses (no Ray). It keeps `launch`'s resume
rules: a stopped run continues exactly where it stopped, and an existing run is never resumed silently."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv5.errors import ConfigError
from rwkv5.train.callbacks import TraceCallback
from rwkv5.train.launch import train_here


def _rows(path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, open(path))}


@pytest.mark.parametrize("overrides", [{}, {"batch.micro_batch": 1, "zero.reduce_once_per_step": True}],
                         ids=["default", "reduce_once_per_step"])
def test_stopped_run_resumes_exactly_and_needs_resume(token_data, small_run, tmp_path, overrides):
    cfg = small_run(4, **overrides)
    straight = train_here(cfg, "straight", token_data, tmp_path, callbacks=[TraceCallback(tmp_path / "a.jsonl")])
    assert (straight.step, straight.applied, straight.tokens_seen) == (4, 4, 4 * 4 * 32)

    trace = tmp_path / "b.jsonl"
    first = train_here(cfg.model_copy(update={"stop_at_step": 2}), "split", token_data, tmp_path,
                       callbacks=[TraceCallback(trace)])
    assert first.step == 2
    with pytest.raises(ConfigError, match="--resume"):
        train_here(cfg, "split", token_data, tmp_path)
    second = train_here(cfg, "split", token_data, tmp_path, resume=True, callbacks=[TraceCallback(trace)])
    assert second.step == 4

    want, got = _rows(tmp_path / "a.jsonl"), _rows(trace)
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step in want:
        assert got[step]["ids"] == want[step]["ids"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6)
    assert (tmp_path / "split" / "milestones" / "m002" / "done.json").is_file()  # 50% and 100% at 4 steps


def test_remote_storage_is_refused_with_the_paths(token_data, small_run):
    with pytest.raises(ConfigError, match="s3://bucket/runs"):
        train_here(small_run(2), "remote", token_data, "s3://bucket/runs")


def test_a_run_paused_at_every_milestone_trains_like_one_that_never_paused(token_data, small_run, tmp_path):
    """Milestone mode `shared`: training ends at each milestone (its checkpoint saved, its files written) and a
    new launch resumes it; step for step, the same samples and the same losses as the straight run."""
    steps = 8
    straight_cfg = small_run(steps, **{"milestones.fraction": 0.25, "checkpoint.every_steps": 3})
    train_here(straight_cfg, "straight", token_data, tmp_path, callbacks=[TraceCallback(tmp_path / "a.jsonl")])

    paused_cfg = straight_cfg.model_copy(update={"milestones": straight_cfg.milestones.model_copy(
        update={"pause": True})})
    trace, stops = tmp_path / "b.jsonl", []
    while not stops or stops[-1] < steps:
        state = train_here(paused_cfg, "paused", token_data, tmp_path, resume=bool(stops),
                           callbacks=[TraceCallback(trace)])
        stops.append(state.step)
        done = sorted(p.parent.name for p in (tmp_path / "paused" / "milestones").glob("m*/done.json"))
        assert len(done) == len(stops), "each launch ends right after its milestone is written"
    assert stops == [2, 4, 6, 8]

    want, got = _rows(tmp_path / "a.jsonl"), _rows(trace)
    assert sorted(got) == sorted(want) == list(range(steps))
    for step in want:
        assert got[step]["ids"] == want[step]["ids"], f"step {step} read other samples"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step


def test_a_milestone_file_holds_the_checkpoint_of_its_step_cast_to_bf16(token_data, small_run, tmp_path):
    """Milestones are written from the training module's weights, without reading the checkpoint back: they
    must equal DeepSpeed's own consolidation of the checkpoint saved at that step, cast to bf16, key for key."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from rwkv5.train.checkpoint import TAG, list_checkpoints

    train_here(small_run(4), "weights", token_data, tmp_path)
    done = json.loads((tmp_path / "weights" / "milestones" / "m002" / "done.json").read_text())
    checkpoint = next(c for c in list_checkpoints(tmp_path / "weights") if c.name.endswith(f"{done['step']:08d}"))
    want = {k: v.to(torch.bfloat16) for k, v in get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint), tag=TAG).items()}
    got = load_file(done["path"])
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
