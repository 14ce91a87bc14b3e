"""A run's recipe: its batch split over the GPUs, its step count, and its expected speed at a measured MFU.

The expected step time is `rwkv5.train.metrics.mfu` solved for time, with the matmul parameters of
`rwkv5.config.count_matmul_parameters`: 6 x matmul parameters x tokens per step / (MFU x peak FLOP/s x GPUs).
The checkpoint interval follows from it, so the preset's `checkpoint.every_steps` can be checked against a
wall-clock bound instead of guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rwkv5.config import count_matmul_parameters
from rwkv5.errors import ConfigError
from rwkv5.train.config import RunConfig
from rwkv5.train.metrics import tokens_per_s_at

__all__ = ["REFERENCE_MFU", "Recipe", "plan_recipe", "format_recipe"]

REFERENCE_MFU = 0.515
"""MFU measured at the 7b preset's width (8 of its 32 layers), micro-batch 2, "selective", compiled, through the
real `train()` on one H100: bench/results/train-7b-L8-1gpu-h100.json (bench/NOTES.md, "Pretraining
throughput"). It is the best measured stand-in for the 8-GPU run, whose all-gather and reduce-scatter it
does not contain."""

_HOUR_S = 3600.0


@dataclass(frozen=True)
class Recipe:
    """What one optimizer step of a run is on `gpus` GPUs, and how long it takes at `mfu`."""

    preset: str
    gpus: int
    micro_batch: int
    grad_accum: int
    sequences_per_step: int
    ctx_len: int
    tokens_per_step: int
    total_steps: int
    mfu: float
    tokens_per_s: float
    """Summed over the GPUs."""
    step_s: float
    checkpoint_every_steps: int
    checkpoint_interval_s: float
    hour_mfu: float
    """The MFU at which checkpoints would be exactly an hour apart: the margin the interval leaves."""
    run_s: float
    """The whole token budget at `tokens_per_s`."""


def plan_recipe(cfg: RunConfig, gpus: int, mfu: float | None = None) -> Recipe:
    """The recipe of `cfg` on `gpus` GPUs of `cfg.metrics.peak_flops` each, running at `mfu`.

    Args:
        cfg (RunConfig): the run (model, batch, checkpoint interval, token budget, peak FLOP/s).
        gpus (int): data-parallel workers, one GPU each.
        mfu (float, optional): model FLOP utilisation in (0, 1]. Default: REFERENCE_MFU, the recorded
            measurement.

    Returns:
        Recipe: the batch split, the step count and the expected times.

    Raises:
        ConfigError: `gpus` or `mfu` out of range, or the batch does not split over `gpus` GPUs.
    """
    mfu = REFERENCE_MFU if mfu is None else mfu
    if gpus <= 0 or not 0 < mfu <= 1:
        raise ConfigError(f"the recipe needs gpus > 0 and mfu in (0, 1], got {gpus} and {mfu}")
    tokens_per_s = tokens_per_s_at(count_matmul_parameters(cfg.model), mfu, cfg.metrics.peak_flops, gpus)
    step_s = cfg.tokens_per_step / tokens_per_s
    interval_s = cfg.checkpoint.every_steps * step_s
    return Recipe(
        preset=cfg.preset, gpus=gpus, micro_batch=cfg.batch.micro_batch, grad_accum=cfg.batch.grad_accum(gpus),
        sequences_per_step=cfg.batch.global_batch, ctx_len=cfg.batch.ctx_len, tokens_per_step=cfg.tokens_per_step,
        total_steps=cfg.total_steps, mfu=mfu, tokens_per_s=tokens_per_s, step_s=step_s,
        checkpoint_every_steps=cfg.checkpoint.every_steps, checkpoint_interval_s=interval_s,
        hour_mfu=mfu * interval_s / _HOUR_S, run_s=cfg.total_steps * step_s,
    )


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * _HOUR_S:
        return f"{seconds / _HOUR_S:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def format_recipe(recipe: Recipe) -> str:
    """A few lines for `rwkv5 plan`."""
    r = recipe
    return "\n".join([
        f"batch: {r.sequences_per_step} sequences x {r.ctx_len} tokens = {r.tokens_per_step:,} tokens per step "
        f"(micro-batch {r.micro_batch} x {r.grad_accum} accumulations x {r.gpus} GPU(s))",
        f"steps in the token budget: {r.total_steps:,}",
        f"at MFU {r.mfu:.3f}: {r.tokens_per_s:,.0f} tokens/s, {r.step_s:.2f} s per step, "
        f"{_duration(r.run_s)} for the budget",
        f"checkpoint every {r.checkpoint_every_steps} steps: {_duration(r.checkpoint_interval_s)} "
        f"(an hour at MFU {r.hour_mfu:.2f})",
    ])
