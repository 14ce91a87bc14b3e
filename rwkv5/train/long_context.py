"""The long-context fine-tune: the chat fine-tune's path (`rwkv5.train.finetune`) on packed long samples.

Everything but the data is the chat fine-tune's: the pretraining loop under DeepSpeed ZeRO-2 (Ray Train or one
process), `finetune_run_config`, base weights from a checkpoint (`FinetuneTask.init_model`), the sample order
of `ChatBatches`, and `segmented_loss` (state passed over segments with full BPTT, one segment recomputed at a
time), here over every token of each sample: memory follows `segment_len`, not the 131,072-token sample.

    samples = pack_long_samples("tokens/train", "longctx/samples", 131072, train=800, heldout=8)
    finetune_long_context("run/milestones/m010/model.safetensors", samples.train, "finetunes", "run-longctx",
                          steps=100, samples_per_step=8, workers=8, gpus_per_worker=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rwkv5.train.chat import DEFAULT_SEGMENT_LEN, segmented_loss
from rwkv5.train.finetune import ChatBatches, FinetuneTask, finetune_run_config

__all__ = ["LongSampleTask", "finetune_long_context"]


class _WholeSamples:
    """Packed long samples as `ChatBatches` reads encoded chat samples: `(ids, mask)` with every token learned."""

    def __init__(self, samples: np.ndarray):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.samples[index], dtype=np.int64)
        return ids, np.ones_like(ids)


@dataclass
class LongSampleTask:
    """The long-context fine-tune's `TrainJob.task` (pickled to workers).

    Args:
        samples (str): a packed `train.npy` (`data_prep.long_samples`) every worker can read.
        init_checkpoint (str, optional): base model (a milestone's model.safetensors). Default: None (tests).
        segment_len (int): tokens per state-passing segment. Default: DEFAULT_SEGMENT_LEN.
    """

    samples: str
    init_checkpoint: str | None = None
    segment_len: int = DEFAULT_SEGMENT_LEN

    def init_model(self, model) -> None:
        FinetuneTask(chat_data=self.samples, init_checkpoint=self.init_checkpoint).init_model(model)

    def batches(self, cfg, rank: int, world_size: int, device) -> ChatBatches:
        from data_prep.long_samples import read_long_samples

        return ChatBatches(_WholeSamples(read_long_samples(self.samples)), cfg.batch, rank, world_size, device,
                           cfg.seed)

    def loss(self, engine, mb) -> torch.Tensor:
        module = getattr(engine, "module", engine)  # segment by segment, as FinetuneTask.loss explains
        return segmented_loss(module, mb.inputs, mb.targets, None, self.segment_len)


def finetune_long_context(base: str, samples: str | Path, storage: str | Path, run_name: str, steps: int,
                          samples_per_step: int = 1, lr: float = 1e-5, segment_len: int = DEFAULT_SEGMENT_LEN,
                          workers: int = 0, gpus_per_worker: float = 0) -> dict:
    """Fine-tune checkpoint `base` on packed long samples as run `run_name` (checkpoints in storage/run_name).

    A finished run is reused and an interrupted one resumes from its checkpoint, so a retried flow run trains
    no step twice. The sample length is the samples file's.

    Returns:
        `{"checkpoint": the tuned model, "first_loss", "last_loss", "steps"}`.
    """
    from data_prep.long_samples import read_long_samples
    from rwkv5.checkpoint import read_checkpoint_config
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.launch import run_training
    from rwkv5.train.milestones import read_done
    from rwkv5.train.trace import read_trace

    run_dir = Path(storage) / run_name
    trace = run_dir / "trace.jsonl"
    samples = str(Path(samples).resolve())  # Ray workers may start in another directory
    if read_done(run_dir, 1) is None:  # the run's one milestone is its last step
        model_cfg, _ = read_checkpoint_config(base)
        sample_len = read_long_samples(samples).shape[1] - 1
        cfg = finetune_run_config(model_cfg, steps=steps, samples_per_step=samples_per_step, max_len=sample_len,
                                  lr=lr, final_lr=lr / 10, warmup_steps=0)
        task = LongSampleTask(samples, str(Path(base).resolve()), segment_len)
        run_training(cfg, run_name, str(Path(samples).parent), storage, workers=workers,
                     gpus_per_worker=gpus_per_worker, resume=bool(list_checkpoints(run_dir)),
                     callbacks=[TraceCallback(trace)], task=task)
    rows = read_trace(trace)
    return {"checkpoint": read_done(run_dir, 1)["path"], "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "steps": len(rows)}
