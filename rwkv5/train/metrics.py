"""Throughput and model FLOP utilisation.

MFU = 6 x matmul parameters x tokens/s / (peak FLOP/s x devices): the usual dense-transformer estimate
(forward 2N, backward 4N per token). It leaves out the WKV recurrence and the recomputation of gradient
checkpointing, so it is a floor on the hardware's real utilisation, comparable across runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["mfu", "tokens_per_s_at", "StepTimer"]


def mfu(matmul_params: int, tokens_per_s: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOP utilisation in [0, 1] for `tokens_per_s` summed over `devices` devices."""
    return 6.0 * matmul_params * tokens_per_s / (peak_flops * devices)


def tokens_per_s_at(matmul_params: int, mfu_value: float, peak_flops: float, devices: int = 1) -> float:
    """Tokens/s summed over `devices` devices that run at `mfu_value`: `mfu` solved for the throughput."""
    return mfu_value * peak_flops * devices / (6.0 * matmul_params)


@dataclass
class StepTimer:
    """Wall time of each optimizer step, split into time spent waiting for data and the rest."""

    data_wait_s: float = 0.0
    _start: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self.data_wait_s = 0.0
        self._start = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self._start
