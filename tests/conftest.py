"""Fixtures shared by the whole suite. Keep generic ones here; area-specific ones live next to their tests."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same RNG state, so a failure reproduces when run alone."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def random_model():
    """Factory `(cfg, seed=0) -> RWKV5` in eval mode whose every parameter matters.

    A fresh model has zero output projections and unit LayerNorms, so two code paths can agree on it while
    one of them ignores those weights. Here zero matrices get random values and vectors some noise.
    """
    from rwkv5.model import RWKV5

    def build(cfg, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = RWKV5(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "time_" in name or "ln" in name.split(".")[-2]:  # schedules and norms
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                elif not p.any():  # zero-initialised projections
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        return model.eval()

    return build
