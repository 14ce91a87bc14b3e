"""The memory plan: what it counts, and that the 7b preset's batch and policy fit 8 x 80 GB with 10% spare."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rwkv5.config import count_parameters
from rwkv5.errors import ConfigError
from rwkv5.train.config import run_preset, with_overrides
from rwkv5.train.memory_plan import plan_memory


def test_7b_preset_fits_8x80gb_with_headroom_and_one_more_sequence_would_not():
    cfg = run_preset("7b")
    plan = plan_memory(cfg, gpus=8, gpu_memory_gb=80)
    assert plan.fits(0.10), plan
    assert plan.grad_accum == 7 and plan.activation_memory == "selective" and plan.micro_batch == 2
    assert not plan_memory(cfg, 8, 80, micro_batch=plan.micro_batch + 1).fits(0.10)
    assert not plan_memory(cfg, 8, 80, activation_memory="none").fits(0.10)


def test_zero2_partitions_optimizer_and_gradients_not_weights():
    cfg = run_preset("7b")
    one, eight = plan_memory(cfg, 1, 80), plan_memory(cfg, 8, 80)
    P = count_parameters(cfg.model)
    assert one.weights == eight.weights == 2 * P
    assert one.optimizer == pytest.approx(8 * eight.optimizer) and one.optimizer == 12 * P
    assert one.gradients == pytest.approx(8 * eight.gradients)
    assert eight.buckets == 2 * one.buckets  # overlap_comm's second buffer on several GPUs only


def test_accumulating_micro_batches_hold_a_second_gradient_partition_in_backward_only():
    cfg = run_preset("7b")
    accumulating = plan_memory(cfg, 8, 80)  # 7 micro-batches a step
    single = plan_memory(with_overrides(cfg, {"batch.global_batch": 16}), 8, 80)  # 2 x 1 x 8: no accumulation
    assert accumulating.grad_accum == 7 and single.grad_accum == 1
    assert single.accumulating == 0 and accumulating.accumulating == accumulating.gradients
    assert accumulating.backward_peak - single.backward_peak == pytest.approx(accumulating.gradients)
    assert accumulating.step_peak == single.step_peak


def test_reducing_once_per_step_holds_full_gradients_instead_of_a_second_partition():
    """On 8 GPUs the 7b preset then needs 2 bytes a parameter more than one partition more, and still fits 80 GB;
    on one GPU the full gradients are the partition, so the peak does not move."""
    cfg = run_preset("7b")
    once_cfg = with_overrides(cfg, {"zero.reduce_once_per_step": True})
    P = count_parameters(cfg.model)
    per_step, once = plan_memory(cfg, 8, 80), plan_memory(once_cfg, 8, 80)
    assert once.accumulating == 0 and once.local_gradients == 2 * P and per_step.local_gradients == 0
    assert once.backward_peak - per_step.backward_peak == pytest.approx(2 * P - per_step.gradients)
    assert once.step_peak == per_step.step_peak and once.fits(0.05) and not once.fits(0.10)
    assert plan_memory(once_cfg, 1, 150).backward_peak == pytest.approx(plan_memory(cfg, 1, 150).backward_peak)


def test_activations_grow_with_micro_batch_and_shrink_with_recomputation():
    cfg = run_preset("7b")
    acts = {p: plan_memory(cfg, 8, 80, activation_memory=p).activations for p in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    a2, a4 = (plan_memory(cfg, 8, 80, micro_batch=b).activations for b in (2, 4))
    head = 2 * cfg.model.vocab_size * cfg.model.n_embd  # the head's gradient does not scale with tokens
    assert a4 - head == pytest.approx(2 * (a2 - head))


def test_plan_command_prints_the_table():
    from rwkv5_app.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "7b", "--gpus", "8", "--gpu-memory", "80"])
    assert result.exit_code == 0, result.output
    for word in ("weights", "gradients", "optimizer", "activations", "total", "headroom"):
        assert word in result.output
    with pytest.raises(ConfigError, match="gpus"):
        plan_memory(run_preset("7b"), 0, 80)


def test_fp8_keeps_bf16_activations_and_adds_one_linears_float8_operands():
    cfg = run_preset("7b")
    bf16 = plan_memory(cfg, 8, 80)
    fp8 = plan_memory(with_overrides(cfg, {"precision": "fp8"}), 8, 80)
    assert fp8.precision == "fp8" and bf16.precision == "bf16"
    assert (fp8.weights, fp8.optimizer, fp8.activations) == (bf16.weights, bf16.optimizer, bf16.activations)
    C, F, tokens = cfg.model.n_embd, cfg.model.ffn, cfg.batch.micro_batch * cfg.batch.ctx_len
    assert fp8.transient - bf16.transient == tokens * (C + F) + 2 * C * F  # ~0.27 GB at 7b
    assert fp8.fits(0.10)
