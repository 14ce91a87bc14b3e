"""Per-position loss on long held-out samples: how well a model uses far context.

The loss at position p is the mean next-token loss over positions (p/2, p] of every sample (position t is the
t-th prediction, made after t ids of context), so the reported positions (1k, 4k, ..., 128k) are bands that
tile the log axis. A long-context fine-tune should lower the far positions most.

The model runs as an RNN over segments of `segment_len` tokens with the state carried between them, so memory
is that of one segment whatever the sample length (`position_losses`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rwkv5.errors import ConfigError
from rwkv5.train.trace import figure_png

__all__ = ["position_losses", "evaluate_long_context", "position_loss_png", "save_position_loss_plot"]


def _windows(positions: Sequence[int], length: int) -> list[tuple[int, int]]:
    """Index ranges [p // 2, p) of the per-position loss vector (index t - 1 holds position t)."""
    if not positions or any(p < 1 or p > length for p in positions):
        raise ConfigError(f"long_context.eval_positions {list(positions)} must lie within [1, {length}]")
    return [(p // 2, p) for p in positions]


@torch.no_grad()
def position_losses(model, samples: np.ndarray | torch.Tensor, positions: Sequence[int],
                    segment_len: int = 4096) -> dict[int, float]:
    """Mean next-token loss around each of `positions` over the samples, in RNN mode.

    Args:
        model: an `RWKV5` (its `forward(idx, state, return_state)`), in eval mode on its device.
        samples: `[n, L + 1]` token ids: L inputs and their shifted targets per sample.
        positions: where to report, each in [1, L].
        segment_len: tokens per forward call; the state passes between calls. Default: 4096.

    Returns:
        {position: mean loss over positions (p/2, p]} in nats.
    """
    if segment_len < 1:
        raise ConfigError(f"long_context.segment_len must be >= 1, got {segment_len}")
    device = next(model.parameters()).device
    length = int(samples.shape[1]) - 1
    windows = _windows(positions, length)
    sums = np.zeros(len(windows))
    for row in samples:
        ids = torch.as_tensor(np.asarray(row, dtype=np.int64), device=device)  # (L + 1,)
        losses = torch.empty(length, dtype=torch.float64)  # (L,) per position; small beside any segment's logits
        state = None
        for start in range(0, length, segment_len):
            end = min(start + segment_len, length)
            logits, state = model(ids[start:end][None], state, return_state=True)  # (1, S, V)
            logits = logits[0].to(torch.promote_types(logits.dtype, torch.float32))  # float64 kept for checks
            losses[start:end] = F.cross_entropy(logits, ids[start + 1: end + 1], reduction="none").cpu()
        sums += [float(losses[a:b].mean()) for a, b in windows]
    return {p: s / len(samples) for p, s in zip(positions, sums)}


def evaluate_long_context(checkpoint: str | os.PathLike, heldout: str | os.PathLike, positions: Sequence[int],
                          segment_len: int = 4096) -> dict:
    """`position_losses` of a saved checkpoint (float32, on `eval_device`) on a packed held-out file.

    Returns:
        `{"long_context": {"positions": {p: loss}, "samples", "sample_len"}, "device"}`: `flat_metrics` names
        the losses `loss_at_<p>`.
    """
    from data_prep.long_samples import read_long_samples
    from rwkv5.checkpoint import load_checkpoint
    from rwkv5.eval.evaluate import eval_device
    from rwkv5.quantize import weight_bytes

    samples = read_long_samples(heldout)
    model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    device = eval_device(weight_bytes(model))
    losses = position_losses(model.to(device).eval(), samples, positions, segment_len)
    return {"long_context": {"positions": losses, "samples": int(samples.shape[0]),
                             "sample_len": int(samples.shape[1]) - 1}, "device": device.type}


def _label(position: int) -> str:
    return f"{position // 1024}k" if position >= 1024 and position % 1024 == 0 else str(position)


def position_loss_png(curves: Mapping[str, Mapping[int, float]], title: str) -> bytes:
    """Loss against position (log axis), one line per curve ("before", "after"), as PNG bytes.

    The bytes are a pure function of the inputs (no software version in the PNG metadata), so a release built
    again from the same evaluations is byte-identical.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        for name, losses in curves.items():
            xs, ys = zip(*sorted((int(p), loss) for p, loss in losses.items()))  # JSON gives string keys
            ax.plot(xs, ys, marker="o", lw=1.2, label=name)
        ticks = sorted({int(p) for losses in curves.values() for p in losses})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [_label(p) for p in ticks])
        ax.minorticks_off()
        ax.set_xlabel("position in the sample (tokens of context)")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        return figure_png(fig)
    finally:
        plt.close(fig)


def save_position_loss_plot(path: str | os.PathLike, curves: Mapping[str, Mapping[int, float]], title: str) -> str:
    """`position_loss_png` written atomically to `path`; returns the path."""
    from data_prep.atomic import atomic_write_bytes

    atomic_write_bytes(path, position_loss_png(curves, title))
    return str(path)
