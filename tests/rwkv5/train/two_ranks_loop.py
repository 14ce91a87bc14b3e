"""Run by test_loop_ranks.py under torchrun (2 CPU ranks, gloo): the same 3 steps under several loop settings.

    python -m torch.distributed.run --nproc-per-node 2 tests/rwkv5/train/two_ranks_loop.py DATA_DIR OUT_DIR

Writes OUT_DIR/losses.json (rank 0): per setting, the mean loss of each step (and `<setting>.grad_norm`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from rwkv5.train.callbacks import Callback
from rwkv5.train.config import run_preset, with_overrides
from rwkv5.train.worker import TrainJob, train

SETTINGS = {
    # 2 ranks x micro-batch 2 = the global batch of 4: one micro-batch per step.
    "micro2_overlap": {"batch.micro_batch": 2, "zero.overlap_comm": True},
    "micro2_no_overlap": {"batch.micro_batch": 2, "zero.overlap_comm": False},
    # The same global batch as 2 accumulated micro-batches of 1 per rank.
    "micro1_accum2": {"batch.micro_batch": 1, "zero.overlap_comm": True},
    # The same, summed where autograd leaves the gradients and reduced once per step (coalesce_grad_reduction).
    "micro1_accum2_once": {"batch.micro_batch": 1, "zero.overlap_comm": True, "zero.reduce_once_per_step": True},
    # Buckets far smaller than the model: many reduce-scatters per backward.
    "micro2_small_buckets": {"batch.micro_batch": 2, "zero.reduce_bucket_size": 20_000,
                             "zero.allgather_bucket_size": 20_000},
    # DeepSpeed's default: each bucket split by owning rank and divided by the world size before the reduce.
    "micro2_reduce_scatter": {"batch.micro_batch": 2, "zero.reduce_scatter": True},
}


class Losses(Callback):
    def __init__(self):
        self.losses = []

        self.grad_norms = []

    def post_step(self, info, metrics):
        self.losses.append(info.loss)
        self.grad_norms.append(info.grad_norm)


def main() -> None:
    data, out = sys.argv[1], Path(sys.argv[2])
    base = {
        "model.vocab_size": 512, "batch.ctx_len": 32, "batch.global_batch": 4, "token_budget": 3 * 4 * 32,
        "optim.warmup_steps": 1, "optim.lr": 3e-3, "optim.final_lr": 3e-4, "checkpoint.every_steps": 100,
        "milestones.fraction": 1.0, "metrics.system_metrics": False,
    }
    results = {}
    for name, overrides in SETTINGS.items():
        cfg = with_overrides(run_preset("tiny"), base | overrides)
        losses = Losses()
        train(TrainJob(cfg, name, data, str(out / "runs"), callbacks=[losses], use_gpu=False))
        results[name] = losses.losses
        results[f"{name}.grad_norm"] = losses.grad_norms
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
