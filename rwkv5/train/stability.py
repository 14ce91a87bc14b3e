"""Guards that keep bad steps away from the weights: non-finite losses/gradients and loss spikes."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from rwkv5.train.config import StabilityConfig

__all__ = ["SpikeDetector", "StepVerdict", "judge_step"]


@dataclass
class SpikeDetector:
    """Running mean and standard deviation of the last `window` finite losses; flags a loss above mean + k sigma.

    Losses of steps that were not applied stay out of the window, so a skipped spike does not hide the next.
    """

    window: int
    sigma: float
    min_history: int
    history: deque = field(default_factory=deque)

    @classmethod
    def from_config(cls, cfg: StabilityConfig) -> "SpikeDetector":
        return cls(window=cfg.spike_window, sigma=cfg.spike_sigma, min_history=cfg.spike_min_history)

    def threshold(self) -> float | None:
        """The loss above which the next step is a spike, or None while the window is too short."""
        if len(self.history) < self.min_history:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        var = sum((x - mean) ** 2 for x in self.history) / (n - 1)
        return mean + self.sigma * math.sqrt(var)

    def is_spike(self, loss: float) -> bool:
        limit = self.threshold()
        return limit is not None and loss > limit

    def update(self, loss: float) -> None:
        """Record an accepted step's loss."""
        self.history.append(float(loss))
        while len(self.history) > self.window:
            self.history.popleft()

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(float(x) for x in state.get("history", []))


@dataclass(frozen=True)
class StepVerdict:
    """What to do with a step whose loss is known but whose update has not been applied."""

    apply: bool
    """Let the optimizer update the weights."""
    nonfinite: bool = False
    spike: bool = False
    rollback: bool = False


def judge_step(loss: float, nonfinite: bool, detector: SpikeDetector, action: str) -> StepVerdict:
    """Decide on one step from its global mean loss and whether any rank saw a non-finite loss.

    The detector sees only accepted, finite losses. A spike under `log` is still applied and recorded.
    """
    if nonfinite or not math.isfinite(loss):
        return StepVerdict(apply=False, nonfinite=True)
    if detector.is_spike(loss):
        if action == "log":
            detector.update(loss)
            return StepVerdict(apply=True, spike=True)
        return StepVerdict(apply=False, spike=True, rollback=action == "rollback")
    detector.update(loss)
    return StepVerdict(apply=True)
