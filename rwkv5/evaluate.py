"""Evaluation: validation loss and perplexity per SlimPajama source.

Windows come from the validation split in stream order (each exactly once), so the numbers are a pure
function of the checkpoint and the dataset.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data_prep.loader import validation_dataset
from rwkv5.model import RWKV5

__all__ = ["ValidationResult", "validation_loss"]


@dataclass
class ValidationResult:
    loss: float
    """Mean next-token cross-entropy (nats) over all evaluated tokens."""
    tokens: int
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    """{source: {"loss", "ppl", "tokens"}}."""

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "by_source": self.by_source}


@torch.no_grad()
def validation_loss(
    model: RWKV5,
    data_dir: str,
    ctx_len: int = 128,
    batch_size: int = 4,
    max_windows: int | None = None,
    expected_tokenizer: str | None = None,
) -> ValidationResult:
    """Mean loss of `model` on the validation windows of `data_dir`, overall and per source.

    Args:
        model (RWKV5): the model (its device is used).
        data_dir (str): a tokenized validation split (manifest.json).
        ctx_len (int): tokens per window. Default: 128.
        batch_size (int): windows per forward. Default: 4.
        max_windows (int, optional): evaluate only the first windows (smoke runs). Default: all.
        expected_tokenizer (str, optional): refuse shards of another tokenizer.
    """
    ds = validation_dataset(data_dir, ctx_len, expected_tokenizer=expected_tokenizer)
    n = len(ds) if max_windows is None else min(len(ds), max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, n, batch_size):
        tokens, ids = ds.batch(range(start, min(start + batch_size, n)))
        x = torch.from_numpy(tokens.astype("int64")).to(device)
        logits = model(x[:, :-1])
        per_window = F.cross_entropy(
            logits.float().transpose(1, 2), x[:, 1:], reduction="none"
        ).sum(dim=1)  # (B,)
        for sample_id, total in zip(ids.tolist(), per_window.tolist()):
            source = ds.source_of(sample_id)
            sums[source] += total
            counts[source] += ctx_len
    model.train(was_training)
    tokens = sum(counts.values())
    by_source = {
        s: {"loss": sums[s] / counts[s], "ppl": math.exp(min(sums[s] / counts[s], 50.0)), "tokens": counts[s]}
        for s in sorted(sums)
    }
    return ValidationResult(loss=sum(sums.values()) / max(tokens, 1), tokens=tokens, by_source=by_source)
