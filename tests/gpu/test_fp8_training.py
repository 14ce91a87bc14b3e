"""Precision "fp8" on a GPU: the real train() (torchao float8 block linears, compiled blocks, "selective"
activation memory, DeepSpeed ZeRO-2 bf16) learns like bf16 from the same seed and data, for both recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gpu.test_compiled_training import _documents, small_run

STEPS = 20


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9+")
    from data_prep.shards import write_token_dataset
    from rwkv5.train.callbacks import Callback
    from rwkv5.train.launch import train_here
    from rwkv5.train.precision import float8_linear_names

    tmp = tmp_path_factory.mktemp("fp8")
    write_token_dataset(tmp / "data", _documents(), "synthetic-gpu-fp8", shard_tokens=10_000_000)

    class Rows(Callback):
        def __init__(self):
            self.losses, self.float8 = [], []

        def pre_train(self, ctx):
            self.float8 = float8_linear_names(ctx.model)

        def post_step(self, info, metrics):
            self.losses.append(info.loss)

    out = {}
    for precision, recipe in (("bf16", "tensorwise"), ("fp8", "tensorwise"), ("fp8", "rowwise")):
        cfg = small_run(STEPS, compile=True, precision=precision, fp8_recipe=recipe)  # FFN 1792: 16-divisible
        rows = Rows()
        train_here(cfg, f"{precision}-{recipe}", tmp / "data", tmp / "runs", callbacks=[rows], use_gpu=True)
        out[precision if precision == "bf16" else recipe] = rows
    return out


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_like_bf16(curves, recipe):
    bf16, fp8 = np.array(curves["bf16"].losses), np.array(curves[recipe].losses)
    print(recipe, "bf16", bf16.round(4).tolist(), "\nfp8", fp8.round(4).tolist())
    assert curves["bf16"].float8 == [] and len(curves[recipe].float8) == 4 * 8
    assert len(fp8) == len(bf16) == STEPS and np.isfinite(fp8).all()
    assert bf16[-1] < bf16[0] - 1.0  # it learns, so the comparison means something
    assert abs(fp8[0] - bf16[0]) < 1e-2 * bf16[0]
    assert np.mean(np.abs(fp8 - bf16) / bf16) < 3e-2
    assert abs(fp8[-5:].mean() - bf16[-5:].mean()) < 3e-2 * bf16[-5:].mean()
