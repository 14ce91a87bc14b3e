"""Compiled blocks train like eager ones: the real train() on one GPU, 30 steps from the same seed and data,
compiled (torch.compile per block, the WKV custom op inside the graph) against eager; the loss curves must agree
within bf16 noise. Also: a Block compiles with fullgraph=True on CUDA (no graph break around the kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkv5.config import ModelConfig
from rwkv5.model import Block

STEPS = 30


def small_run(steps: int, **overrides):
    """The GPU tests' training run: 4 layers x 512 (every linear 16-divisible), ctx 512, batch 8, "selective"."""
    from rwkv5.train.config import run_preset, with_overrides

    return with_overrides(run_preset("tiny"), {
        "model.n_layer": 4, "model.n_embd": 512, "model.head_size": 64, "model.vocab_size": 4096,
        "batch.ctx_len": 512, "batch.micro_batch": 4, "batch.global_batch": 8,
        "token_budget": (steps + 1) * 8 * 512, "optim.lr": 1e-3, "optim.warmup_steps": 5,
        "checkpoint.every_steps": 10**6, "milestones.fraction": 1.0, "metrics.system_metrics": False,
        "activation_memory": "selective", "stop_at_step": steps, **overrides,
    })


def _documents(seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(3000):
        start, step, length = rng.integers(1, 3000), rng.integers(1, 7), rng.integers(100, 2000)
        yield np.append((start + step * np.arange(length)) % 4000 + 1, 0).astype(np.uint16)


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_block_compiles_without_graph_breaks_on_cuda(policy):
    cfg = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=1024)
    block = Block(cfg, 1, policy).cuda().to(torch.bfloat16).train()
    ref = Block(cfg, 1, policy).cuda().to(torch.bfloat16).train()
    ref.load_state_dict(block.state_dict())
    block.compile(fullgraph=True, dynamic=False)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    outs = []
    for b in (ref, block):
        xi = x.clone().requires_grad_()
        y = b(xi)[0]
        y.float().square().mean().backward()
        outs.append((y.float(), xi.grad.float()))
    for got, want in zip(outs[1], outs[0]):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_compiled_loss_curve_equals_eager(tmp_path):
    from data_prep.shards import write_token_dataset
    from rwkv5.train.callbacks import Callback
    from rwkv5.train.launch import train_here

    data = tmp_path / "data"
    write_token_dataset(data, _documents(), "synthetic-gpu-test", shard_tokens=10_000_000)

    class Rows(Callback):
        def __init__(self):
            self.losses, self.compile_s = [], None

        def post_step(self, info, metrics):
            self.losses.append(info.loss)
            self.compile_s = self.compile_s or metrics.get("compile_s")

    curves = {}
    for compiled in (False, True):
        cfg = small_run(STEPS, compile=compiled)
        rows = Rows()
        train_here(cfg, f"compiled-{compiled}", data, tmp_path / "runs", callbacks=[rows], use_gpu=True)
        curves[compiled] = (np.array(rows.losses), rows.compile_s)
    eager, (comp, compile_s) = curves[False][0], curves[True]
    print("eager", eager.round(4).tolist(), "\ncompiled", comp.round(4).tolist(), "\ncompile_s", compile_s)
    assert compile_s is not None and curves[False][1] is None
    assert len(eager) == len(comp) == STEPS
    assert eager[-1] < eager[0] - 1.0  # it learns, so the comparison means something
    # bf16 noise: the first step sees identical weights; later steps drift by rounding only.
    assert abs(comp[0] - eager[0]) < 1e-2 * eager[0]
    assert np.max(np.abs(comp - eager) / eager) < 3e-2
    assert np.mean(np.abs(comp - eager) / eager) < 1e-2
