"""Which samples each worker reads: its slice of the global order.

Global batch b covers dataset positions b*G .. b*G+G-1 (G = batch.global_batch). Rank r of W takes the
contiguous slice [r*G/W, (r+1)*G/W) and cuts it into micro-batches. The global order, and so what a step
trains on, does not depend on W: a run can resume on a different number of workers.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from data_prep.loader import rank_positions
from rwkv5.train.config import BatchConfig

__all__ = ["micro_batch_positions", "global_positions", "MicroBatch", "RankBatches"]


def global_positions(batch_index: int, cfg: BatchConfig) -> range:
    """Dataset positions of global batch `batch_index`."""
    start = batch_index * cfg.global_batch
    return range(start, start + cfg.global_batch)


def micro_batch_positions(batch_index: int, cfg: BatchConfig, rank: int, world_size: int) -> list[list[int]]:
    """Positions of each micro-batch that `rank` reads for global batch `batch_index`.

    The rank's block is `data_prep.loader.rank_positions` of the global batch; it is cut into grad_accum
    lists of micro_batch positions each.
    """
    accum = cfg.grad_accum(world_size)
    block = rank_positions(batch_index * cfg.global_batch, cfg.micro_batch * accum, rank, world_size).tolist()
    return [block[i * cfg.micro_batch:(i + 1) * cfg.micro_batch] for i in range(accum)]


class MicroBatch:
    """Inputs `[B, T]` and targets `[B, T]` as int64 on the device, with the sample ids `[B]` they came from."""

    __slots__ = ("inputs", "targets", "sample_ids")

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, sample_ids: torch.Tensor):
        self.inputs, self.targets, self.sample_ids = inputs, targets, sample_ids


class RankBatches:
    """Reads this rank's micro-batches of a global batch from a `PackedDataset`, timing the wait.

    Args:
        dataset: a `data_prep.loader.PackedDataset` (anything with `batch(positions)`).
        cfg (BatchConfig): batch shape.
        rank (int), world_size (int): this worker's place.
        device (torch.device): where the tensors go.
    """

    def __init__(self, dataset, cfg: BatchConfig, rank: int, world_size: int, device: torch.device):
        self.dataset, self.cfg = dataset, cfg
        self.rank, self.world_size, self.device = rank, world_size, device
        self.wait_s = 0.0

    def micro_batches(self, batch_index: int):
        """Yield the grad_accum micro-batches of global batch `batch_index` for this rank."""
        for positions in micro_batch_positions(batch_index, self.cfg, self.rank, self.world_size):
            t0 = time.perf_counter()
            tokens, ids = self.dataset.batch(positions)  # (B, T+1) uint16, (B,) int64
            window = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            if self.device.type == "cuda":
                window = window.pin_memory()  # a copy from pageable memory would wait for the GPU
            window = window.to(self.device, non_blocking=True)
            self.wait_s += time.perf_counter() - t0
            yield MicroBatch(window[:, :-1], window[:, 1:], torch.as_tensor(np.asarray(ids, dtype=np.int64)))

    def take_wait(self) -> float:
        """Seconds spent reading since the last call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited
