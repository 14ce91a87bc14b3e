"""Learning rate: linear warm-up over a few steps, then cosine decay to a final rate over the token budget.

A pure function of the step, so a resumed run needs no scheduler state beyond the step counter.
"""

from __future__ import annotations

import math

from rwkv5.train.config import OptimConfig

__all__ = ["lr_at", "apply_lr"]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The base learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warm-up: lr * (step + 1) / warmup_steps, so the first step already moves. Then cosine from lr at the end
    of warm-up to final_lr at the last step; steps past the budget stay at final_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, lr: float) -> None:
    """Set every parameter group's rate to lr times its `lr_scale` (time_decay trains faster)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
