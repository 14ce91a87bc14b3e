"""Side effects of training as small hook classes (OLMo-core's habit): the loop only calls them.

Every callback runs on every rank and guards rank 0 itself. Hooks, in the order the loop calls them:
`pre_train` once, then per optimizer step `post_step` (may add entries to the metrics dict) and
`log_metrics` (every `metrics.log_every` steps), `post_checkpoint_saved` after each checkpoint,
`on_milestone` after a milestone file is written, `post_rollback` after a spike rollback, `on_error` if training raises, and `close` on every exit.
Callbacks are pickled into the Ray workers, so they hold configuration only until `pre_train`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv5.train.metrics import mfu

__all__ = [
    "TrainContext",
    "StepInfo",
    "MilestoneInfo",
    "Callback",
    "SpeedCallback",
    "TraceCallback",
    "MilestoneHook",
]


@dataclass
class TrainContext:
    """What a callback may know about the run it serves."""

    run_name: str
    rank: int
    world_size: int
    device: torch.device
    config: Any
    """The RunConfig."""
    matmul_params: int
    run_dir: Path
    resumed_from_step: int | None = None
    model: Any = None
    """The module being trained (bf16 weights, full on every rank under ZeRO-2); read it, never modify it."""
    engine: Any = None
    """The DeepSpeed engine; benchmarks wrap its forward/backward/step to time the phases of a step."""


@dataclass
class StepInfo:
    """One optimizer step, as all ranks agree on it (losses are averaged over ranks)."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_seen: int
    step_time_s: float
    data_wait_s: float
    applied: bool
    nonfinite: bool = False
    spike: bool = False
    sample_ids: list[int] | None = None
    """Global sample ids of the step in position order; filled only if a callback sets `wants_sample_ids`."""
    compile_s: float | None = None
    """Wall time of the first micro-batch of a compiled model (compilation and its run), not in step_time_s."""


@dataclass
class MilestoneInfo:
    index: int
    """1-based milestone number: milestone i is passed at i * fraction of the token budget."""
    step: int
    tokens_seen: int
    path: Path
    """The consolidated bf16 checkpoint."""


class Callback:
    """Base hook class: every hook is optional. `state_dict` is saved in checkpoints under the class name."""

    wants_sample_ids = False

    def pre_train(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    def post_step(self, info: StepInfo, metrics: dict[str, float]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def post_checkpoint_saved(self, step: int) -> None:
        pass

    def on_milestone(self, info: MilestoneInfo) -> None:
        pass

    def post_rollback(self, bad_step: int, restored_step: int) -> None:
        """The weights were reloaded from the checkpoint of `restored_step` after a spike at `bad_step`."""

    def on_error(self, exc: BaseException) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SpeedCallback(Callback):
    """Tokens/s (global and per device), MFU, data wait and device memory for each step."""

    def post_step(self, info: StepInfo, metrics: dict[str, float]) -> None:
        cfg = self.ctx.config
        tokens_per_s = cfg.tokens_per_step / max(info.step_time_s, 1e-9)
        metrics["tokens_per_s"] = tokens_per_s
        metrics["tokens_per_s_per_device"] = tokens_per_s / self.ctx.world_size
        metrics["mfu"] = mfu(self.ctx.matmul_params, tokens_per_s, cfg.metrics.peak_flops, self.ctx.world_size)
        metrics["data_wait_s"] = info.data_wait_s
        metrics["step_time_s"] = info.step_time_s
        if info.compile_s is not None:
            metrics["compile_s"] = info.compile_s
        if self.ctx.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
            metrics["gpu_mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.ctx.device) / 2**30
        else:
            import psutil

            metrics["cpu_rss_gb"] = psutil.Process().memory_info().rss / 2**30


class TraceCallback(Callback):
    """Rank 0 appends one JSON line per step (step, loss, lr, sample ids) to a file: the record that resume and
    fault tests compare, and a cheap audit of what a run trained on."""

    wants_sample_ids = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def post_step(self, info: StepInfo, metrics: dict[str, float]) -> None:
        if self.ctx.rank != 0:
            return
        row = {
            "step": info.step, "loss": info.loss, "lr": info.lr, "applied": info.applied,
            "nonfinite": info.nonfinite, "spike": info.spike, "ids": info.sample_ids,
            "world_size": self.ctx.world_size, "time": time.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class MilestoneHook(Callback):
    """Calls `fn(info)` on rank 0 for each milestone (the orchestration layer passes an event emitter)."""

    fn: Any = None
    fired: list[int] = field(default_factory=list)

    def on_milestone(self, info: MilestoneInfo) -> None:
        if self.ctx.rank == 0 and self.fn is not None:
            self.fn(info)
            self.fired.append(info.index)
