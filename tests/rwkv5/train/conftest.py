"""Fixtures for the training tests: a small synthetic token dataset and a test-sized run config."""

from __future__ import annotations

import numpy as np
import pytest

# Synthetic ids stay below this, so the tests can shrink the 65536-way head (the CPU cost of the tiny model).
TEST_VOCAB = 512


def _documents(n_docs: int, seed: int):
    """Arithmetic sequences of ids: learnable within a few steps, so a falling loss is a real signal."""
    rng = np.random.default_rng(seed)
    for _ in range(n_docs):
        start, step, length = rng.integers(1, 300), rng.integers(1, 4), rng.integers(40, 400)
        doc = (start + step * np.arange(length)) % 400 + 1
        yield np.append(doc, 0).astype(np.uint16)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """A dataset directory of ~90k tokens in a few shards, written with data_prep's writer."""
    from data_prep.shards import write_token_dataset

    out = tmp_path_factory.mktemp("tokens")
    write_token_dataset(out, _documents(400, seed=0), "synthetic-test", shard_tokens=30_000)
    return out


@pytest.fixture
def small_run():
    """Factory for the tiny run preset shrunk for tests: vocab 512, 16 tokens x 4 sequences per step."""
    from rwkv5.train.config import run_preset, with_overrides

    def build(steps: int, **overrides):
        base = {
            "model.vocab_size": TEST_VOCAB,
            "batch.ctx_len": 32,
            "batch.micro_batch": 2,
            "batch.global_batch": 4,
            "token_budget": steps * 4 * 32,
            "optim.warmup_steps": 2,
            "optim.lr": 3e-3,
            "optim.final_lr": 3e-4,
            "checkpoint.every_steps": 2,
            "checkpoint.keep_last": 2,
            "milestones.fraction": 0.5,
            "metrics.system_metrics": False,
        }
        return with_overrides(run_preset("tiny"), base | overrides)

    return build
