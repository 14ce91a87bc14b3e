"""Pretraining: a DeepSpeed ZeRO-2 bf16 loop that Ray Train runs on every worker, with exact resume."""

from rwkv5.train.config import RUN_PRESETS, RunConfig, run_preset, with_overrides

__all__ = ["RUN_PRESETS", "RunConfig", "run_preset", "with_overrides"]
