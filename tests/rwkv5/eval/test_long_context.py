"""Per-position loss on long samples (RNN mode, state carried over segments) against a direct computation:
one full forward over each sample, the loss of every position, the mean over each window (p/2, p]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv5.config import ModelConfig
from rwkv5.errors import ConfigError
from rwkv5.eval.evaluate import flat_metrics
from rwkv5.eval.long_context import evaluate_long_context, position_loss_png, position_losses

CFG = ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
POSITIONS = [1, 3, 16, 50, 100]


@pytest.fixture(scope="module")
def model(random_model):
    return random_model(CFG, seed=5).double()


@pytest.fixture(scope="module")
def samples():
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 101)).astype(np.uint16)  # L = 100


def _direct(model, samples, positions):
    ids = torch.as_tensor(samples.astype(np.int64))
    with torch.no_grad():
        logits = model(ids[:, :-1])  # (n, L, V): the whole sample at once, no state passing
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (n, L)
    # Position t is the t-th prediction (index t - 1); the window of p holds positions p/2 < t <= p.
    return {p: float(losses[:, p // 2: p].mean(dim=1).mean()) for p in positions}


@pytest.mark.parametrize("segment_len", [7, 100, 4096], ids=["seg7", "seg-whole", "seg-longer"])
def test_position_losses_equal_a_direct_full_forward(model, samples, segment_len):
    expected = _direct(model, samples, POSITIONS)
    got = position_losses(model, samples, POSITIONS, segment_len)
    assert list(got) == POSITIONS
    for p in POSITIONS:
        assert got[p] == pytest.approx(expected[p], rel=1e-10), p


def test_positions_outside_the_sample_are_refused(model, samples):
    with pytest.raises(ConfigError, match=r"eval_positions \[16, 101\] must lie within \[1, 100\]"):
        position_losses(model, samples, [16, 101])
    with pytest.raises(ConfigError, match="segment_len must be >= 1"):
        position_losses(model, samples, [16], segment_len=0)


def test_evaluate_long_context_scores_a_saved_checkpoint_on_a_packed_file(tmp_path, random_model, samples):
    from rwkv5.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = save_checkpoint(random_model(CFG, seed=6), tmp_path / "model.safetensors", {"step": 1})
    np.save(tmp_path / "heldout.npy", samples)

    report = evaluate_long_context(checkpoint, tmp_path / "heldout.npy", POSITIONS, segment_len=33)

    assert report["long_context"]["samples"] == 3 and report["long_context"]["sample_len"] == 100
    expected = _direct(load_checkpoint(checkpoint, dtype=torch.float64)[0].eval(), samples, POSITIONS)
    for p in POSITIONS:  # evaluated in float32
        assert report["long_context"]["positions"][p] == pytest.approx(expected[p], rel=1e-5)
    assert sorted(flat_metrics(report)) == [f"loss_at_{p:06d}" for p in POSITIONS]


def test_the_plot_is_a_png_and_a_pure_function_of_the_losses():
    curves = {"before": {16: 6.1, 64: 6.0, 2048: 5.9}, "after": {"16": 5.8, "64": 5.6, "2048": 5.3}}
    png = position_loss_png(curves, "tiny: held-out loss by position")
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    assert position_loss_png(curves, "tiny: held-out loss by position") == png
    assert position_loss_png({"before": curves["before"]}, "tiny: held-out loss by position") != png
