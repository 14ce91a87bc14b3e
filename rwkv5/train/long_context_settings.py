"""What the long-context stage does: one typed object, like `MilestoneSettings`.

The pretrain flow carries it inside its milestone settings (`MilestoneSettings.long_context`), the milestone
flow sends it whole in the event it emits once the last milestone is released, and the `longctx` flow takes it
as one parameter, validated here once. The defaults are the real stage: samples of 131,072 positions and the
loss at positions 1k to 128k; the tiny demo scales everything down (prefect.yaml).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from rwkv5.errors import ConfigError
from rwkv5.train.config import validate_section

__all__ = ["LongContextSettings", "long_context_settings_from"]


class LongContextSettings(BaseModel):
    """The `longctx` flow's knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_len: int = 131072
    """Positions per long sample (each is packed from the run's training shards, `data_prep.long_samples`)."""
    steps: int = 100
    """Optimizer steps of the long-context fine-tune."""
    samples_per_step: int = 8
    """Long samples per optimizer step (one per micro-batch: a worker takes one sample at a time)."""
    lr: float = 1e-5
    """Peak learning rate (cosine to a tenth of it)."""
    segment_len: int = 4096
    """Tokens per state-passing segment: memory follows it, not `sample_len` (`rwkv5.train.chat.segmented_loss`)."""
    heldout_samples: int = 8
    """Long samples held out of the fine-tune and scored per position before and after it."""
    eval_positions: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    """Positions the loss is reported at: each is the mean loss over positions (p/2, p] of the held-out samples."""
    scan_tokens: int | None = 2_000_000_000
    """Ids of each source read at most when looking for the longest documents. None: all."""
    workers: int = 1
    """Ray Train workers of the fine-tune; 0 trains in the flow run's own process (the CPU demo)."""
    gpus_per_worker: float = 1
    """GPUs of each worker (0: CPU)."""
    release_to: str | None = None
    """Where the release goes: a folder or fsspec URL (sub-folder `longctx`) or a Hub repo `hf://org/name`
    (branch `longctx`). None: the state directory's releases/<run>/longctx."""
    data_source: str = "sample"
    """The pretraining source whose tokenized train split the samples come from; the milestone flow fills in
    the run's."""

    @model_validator(mode="after")
    def _check(self) -> "LongContextSettings":
        for name in ("sample_len", "steps", "samples_per_step", "segment_len", "heldout_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"long_context.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.gpus_per_worker < 0:
            raise ConfigError(f"long_context.workers ({self.workers}) and long_context.gpus_per_worker "
                              f"({self.gpus_per_worker}) must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"long_context.lr must be > 0, got {self.lr}")
        positions = list(self.eval_positions)
        if not positions or positions != sorted(set(positions)) or positions[0] < 1 or positions[-1] > self.sample_len:
            raise ConfigError(f"long_context.eval_positions must rise strictly within [1, sample_len "
                              f"{self.sample_len}], got {positions}")
        return self

    @property
    def train_samples(self) -> int:
        """Long samples the fine-tune reads: each is trained on once."""
        return self.steps * self.samples_per_step


def long_context_settings_from(value: "LongContextSettings | dict | None") -> LongContextSettings:
    """Settings from a flow parameter or an event payload (a dict), with errors that name the field."""
    return validate_section(LongContextSettings, value, "long_context")
