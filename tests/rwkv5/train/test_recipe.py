"""The 7b preset's recipe: the reference run's batch, and checkpoints within an hour at the measured speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkv5.config import count_matmul_parameters
from rwkv5.errors import ConfigError
from rwkv5.train.config import run_preset, with_overrides
from rwkv5.train.metrics import mfu
from rwkv5.train.recipe import REFERENCE_MFU, plan_recipe

RECORD = Path(__file__).resolve().parents[3] / "bench" / "results" / "train-7b-L8-1gpu-h100.json"


def test_7b_takes_the_reference_runs_batch_and_schedule():
    cfg = run_preset("7b")
    recipe = plan_recipe(cfg, gpus=8)
    assert (recipe.sequences_per_step, recipe.ctx_len, recipe.tokens_per_step) == (112, 4096, 458_752)
    assert (recipe.micro_batch, recipe.grad_accum, recipe.gpus) == (2, 7, 8)
    # The reference run had seen 40.5B tokens at step 88,000.
    assert 88_000 * recipe.tokens_per_step == pytest.approx(40.5e9, rel=0.01)
    assert recipe.total_steps == 627_000_000_000 // 458_752
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (2e-4, 10) and cfg.optim.final_lr < cfg.optim.lr


def test_7b_checkpoints_at_most_an_hour_apart_at_the_recorded_mfu():
    record = json.loads(RECORD.read_text())
    assert REFERENCE_MFU == pytest.approx(record["mfu"], abs=5e-4)
    recipe = plan_recipe(run_preset("7b"), gpus=8)
    # Within the hour with a margin for the 8-GPU communication the measurement lacks, not needlessly often.
    assert 0.75 * 3600 <= recipe.checkpoint_interval_s <= 3600, recipe
    assert recipe.hour_mfu == pytest.approx(REFERENCE_MFU * recipe.checkpoint_interval_s / 3600)


def test_expected_step_time_reproduces_the_recorded_measurement():
    """The recorded run (7b width, 8 layers, 128 sequences on one GPU) at its own MFU gives its own step time:
    the recipe inverts the formula the run's MFU was computed with."""
    record = json.loads(RECORD.read_text())
    cfg = with_overrides(run_preset("7b"), {"model.n_layer": record["model"]["n_layer"],
                                            "batch.global_batch": record["batch"]["global_batch"]})
    recipe = plan_recipe(cfg, gpus=1, mfu=record["mfu"])
    assert recipe.step_s == pytest.approx(record["step_time_s"], rel=1e-6)
    n = count_matmul_parameters(cfg.model)
    assert mfu(n, recipe.tokens_per_s, cfg.metrics.peak_flops) == pytest.approx(record["mfu"])


def test_recipe_rejects_a_batch_that_does_not_split_and_a_bad_mfu():
    cfg = run_preset("7b")
    with pytest.raises(ConfigError, match="batch.global_batch"):
        plan_recipe(cfg, gpus=64)
    with pytest.raises(ConfigError, match="mfu"):
        plan_recipe(cfg, gpus=8, mfu=0)


def test_plan_command_states_the_recipe():
    from rwkv5_app.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "7b", "--gpus", "8", "--gpu-memory", "80"])
    assert result.exit_code == 0, result.output
    for text in ("112 sequences x 4096 tokens = 458,752 tokens per step", "micro-batch 2 x 7 accumulations x 8",
                 "steps in the token budget: 1,366,751", "at MFU 0.515", "4.90 s per step",
                 "checkpoint every 600 steps: 49 min"):
        assert text in result.output
