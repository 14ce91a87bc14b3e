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
