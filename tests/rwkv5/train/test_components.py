"""Unit tests of the training components that need no process group: config, schedule, groups, data
slicing, stability guards, milestones, MFU and the resume guard."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv5.config import model_preset
from rwkv5.errors import CheckpointError, ConfigError
from rwkv5.train.config import RUN_PRESETS, BatchConfig, OptimConfig, StabilityConfig, run_preset, with_overrides


@pytest.mark.parametrize("name", sorted(RUN_PRESETS))
def test_presets_build(name):
    cfg = run_preset(name)
    assert cfg.total_steps >= 1
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.eps == 1e-8


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch.global_batch"):
        BatchConfig(ctx_len=8, micro_batch=3, global_batch=8)
    with pytest.raises(ConfigError, match="workers"):
        BatchConfig(ctx_len=8, micro_batch=2, global_batch=8).grad_accum(3)
    with pytest.raises(ConfigError, match="unknown config field 'optim.nope'"):
        with_overrides(run_preset("tiny"), {"optim.nope": 1})
    with pytest.raises(ConfigError, match="unknown run preset"):
        run_preset("13b")
    with pytest.raises(ConfigError, match="precision"):
        with_overrides(run_preset("tiny"), {"precision": "fp16"})
    with pytest.raises(ConfigError, match="fp8_recipe"):
        with_overrides(run_preset("tiny"), {"precision": "fp8", "fp8_recipe": "blockwise"})
    assert run_preset("7b").precision == "bf16" and run_preset("tiny").fp8_recipe == "tensorwise"


def test_lr_schedule_warmup_then_cosine_to_final():
    from rwkv5.train.lr_schedule import lr_at

    cfg = OptimConfig(lr=2e-4, final_lr=2e-5, warmup_steps=10)
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(2e-5)
    mid = 10 + 99 // 2
    assert lrs[mid] == pytest.approx(2e-5 + 0.5 * (2e-4 - 2e-5) * (1 + math.cos(math.pi * (mid - 10) / 99)))


def test_param_groups_decay_matrices_only_and_scale_time_decay():
    from rwkv5.model import RWKV5
    from rwkv5.train.lr_schedule import apply_lr
    from rwkv5.train.optim import param_groups

    model = RWKV5(model_preset("tiny").model_copy(update={"vocab_size": 64}))
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1, time_decay_lr_scale=2.0))}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["matrices"]["params"]}
    assert "head.weight" in decayed and "blocks.0.att.key.weight" in decayed
    assert not any("time_" in n or "ln" in n for n in decayed)
    assert {names[id(p)] for p in groups["time_decay"]["params"]} == {"blocks.0.att.time_decay",
                                                                      "blocks.1.att.time_decay"}
    assert groups["time_decay"]["weight_decay"] == 0 and groups["vectors"]["weight_decay"] == 0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    opt = torch.optim.AdamW(list(groups.values()))
    apply_lr(opt, 1e-3)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"matrices": 1e-3, "time_decay": 2e-3, "vectors": 1e-3}


def test_guarded_optimizer_skip_leaves_params_and_state():
    from rwkv5.train.optim import build_optimizer

    p = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer([{"params": [p]}], OptimConfig(), torch.device("cpu"))
    p.grad = torch.ones(4)
    opt.skip_next = True
    opt.step()
    assert torch.equal(p.data, torch.ones(4)) and not opt.state
    opt.skip_next = False
    opt.step()
    assert not torch.equal(p.data, torch.ones(4))


def test_rank_slices_cover_the_global_batch_for_any_worker_count():
    from rwkv5.train.data import global_positions, micro_batch_positions

    cfg = BatchConfig(ctx_len=8, micro_batch=2, global_batch=8)
    for world in (1, 2, 4):
        got = [p for r in range(world) for mb in micro_batch_positions(3, cfg, r, world) for p in mb]
        assert got == list(global_positions(3, cfg))
        assert all(len(mb) == 2 for r in range(world) for mb in micro_batch_positions(3, cfg, r, world))


def test_spike_detector_and_verdicts():
    from rwkv5.train.stability import SpikeDetector, judge_step

    det = SpikeDetector.from_config(StabilityConfig(spike_window=5, spike_sigma=3.0, spike_min_history=3))
    assert judge_step(float("nan"), False, det, "skip").apply is False
    for loss in (2.0, 2.1, 1.9):
        assert judge_step(loss, False, det, "skip").apply
    assert judge_step(2.05, True, det, "skip").nonfinite
    v = judge_step(9.0, False, det, "rollback")
    assert v.spike and v.rollback and not v.apply
    assert len(det.history) == 3  # skipped spikes stay out of the window
    v = judge_step(9.0, False, det, "log")
    assert v.spike and v.apply
    restored = SpikeDetector.from_config(StabilityConfig(spike_window=5, spike_sigma=3.0, spike_min_history=3))
    restored.load_state_dict(det.state_dict())
    assert list(restored.history) == list(det.history)


def test_milestones_crossed():
    from rwkv5.train.milestones import crossed

    assert crossed(0, 1000, 0.1) == []
    assert crossed(99, 1000, 0.1) == []
    assert crossed(100, 1000, 0.1) == [1]
    assert crossed(1000, 1000, 0.1) == list(range(1, 11))
    assert crossed(700, 1000, 0.25) == [1, 2]


def test_mfu_formula():
    from rwkv5.config import count_matmul_parameters
    from rwkv5.train.metrics import mfu

    n = count_matmul_parameters(model_preset("169m"))
    assert mfu(n, 1e5, 989e12) == pytest.approx(6 * n * 1e5 / 989e12)
    assert mfu(n, 2e5, 989e12, devices=2) == pytest.approx(mfu(n, 1e5, 989e12))


def test_existing_run_name_needs_resume(tmp_path):
    from rwkv5.train.checkpoint import TAG, STATE_FILE
    from rwkv5.train.launch import check_resume

    assert check_resume(tmp_path, "run", resume=False) == []
    ckpt = tmp_path / "run" / "step_00000004"
    (ckpt / TAG).mkdir(parents=True)
    (ckpt / STATE_FILE).write_text('{"step": 4}')
    with pytest.raises(ConfigError, match="--resume"):
        check_resume(tmp_path, "run", resume=False)
    assert check_resume(tmp_path, "run", resume=True) == [ckpt]


def test_param_mismatch_lists_keys(tmp_path):
    import json

    from rwkv5.model import RWKV5
    from rwkv5.train.checkpoint import SHAPES_FILE
    from rwkv5.train.surgery import plan_resume

    model = RWKV5(model_preset("tiny").model_copy(update={"vocab_size": 64}))
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if n != "blocks.1.att.gate.weight"}
    (tmp_path / SHAPES_FILE).write_text(json.dumps(shapes))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.att\.gate\.weight.*--init-missing|"
                                              r"--init-missing.*missing: blocks\.1\.att\.gate\.weight"):
        plan_resume(model, tmp_path, 1, init_missing=False, rank=0, seed=0)
