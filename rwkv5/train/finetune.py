"""Chat fine-tuning under DeepSpeed ZeRO-2 bf16 through the pretraining path (Ray Train or one process).

The pretraining worker loop (`rwkv5.train.worker.train`) runs it unchanged: engine setup, optimizer guard,
checkpoints and resume by run name, stability guards, MLflow and speed callbacks, and milestones (one at the
end, `milestones.fraction = 1.0`, is the consolidated fine-tuned model). Only three things differ, and
`FinetuneTask` supplies them through `TrainJob.task`:

- the initial weights come from a base checkpoint (a resumed run still loads its own checkpoint),
- the data are chat samples (JSONL) with an assistant mask, one sample per micro-batch by default so that a
  128k-token sample is never padded,
- the loss is `rwkv5.train.chat.segmented_loss`: state passing over segments with full BPTT and one segment
  recomputed at a time, so memory follows `segment_len`, not the sample length.

    cfg = finetune_run_config(model_preset("169m"), steps=100, samples_per_step=8)
    task = FinetuneTask(chat_data="chat.jsonl", init_checkpoint="m3/model.safetensors")
    finetune(cfg, task, "ft-m3", storage="runs", workers=8, gpus_per_worker=1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rwkv5.config import ModelConfig
from rwkv5.errors import CheckpointError, ConfigError
from rwkv5.train.chat import (
    DEFAULT_HELDOUT,
    DEFAULT_SEGMENT_LEN,
    encode_chat_samples,
    heldout_split,
    read_chat_jsonl,
    segmented_loss,
)
from rwkv5.train.config import (
    BatchConfig,
    CheckpointConfig,
    MetricsConfig,
    MilestoneConfig,
    OptimConfig,
    RunConfig,
)
from rwkv5.train.data import micro_batch_positions

__all__ = ["FinetuneTask", "ChatMicroBatch", "ChatBatches", "finetune_run_config", "finetune", "finetune_milestone"]


def finetune_run_config(
    model: ModelConfig,
    steps: int,
    samples_per_step: int = 8,
    max_len: int = 131072,
    lr: float = 1e-5,
    final_lr: float = 1e-6,
    warmup_steps: int = 10,
    checkpoint_every: int = 100,
    grad_checkpoint: bool = False,
    seed: int = 0,
) -> RunConfig:
    """A `RunConfig` for fine-tuning: `steps` optimizer steps of `samples_per_step` samples (one per micro-batch).

    `batch.ctx_len` holds `max_len` (the longest sample kept); the token budget is steps x samples x max_len,
    so the schedule spans exactly `steps` steps. MLflow goes to the experiment "rwkv5-finetune".
    """
    if steps < 1 or samples_per_step < 1:
        raise ConfigError(f"finetune.steps ({steps}) and finetune.samples_per_step ({samples_per_step}) must be >= 1")
    batch = BatchConfig(ctx_len=max_len, micro_batch=1, global_batch=samples_per_step)
    return RunConfig(
        preset="finetune",
        model=model,
        token_budget=steps * samples_per_step * max_len,
        seed=seed,
        batch=batch,
        optim=OptimConfig(lr=lr, final_lr=final_lr, warmup_steps=warmup_steps, weight_decay=0.0),
        checkpoint=CheckpointConfig(every_steps=checkpoint_every, keep_last=2),
        milestones=MilestoneConfig(fraction=1.0),
        metrics=MetricsConfig(mlflow_experiment="rwkv5-finetune"),
        activation_memory="full" if grad_checkpoint else "none",
    )


class ChatMicroBatch:
    """Inputs, targets and the assistant mask `[B, T]` on the device, and the sample ids `[B]`."""

    __slots__ = ("inputs", "targets", "mask", "sample_ids")

    def __init__(self, inputs, targets, mask, sample_ids):
        self.inputs, self.targets, self.mask, self.sample_ids = inputs, targets, mask, sample_ids


class ChatBatches:
    """This rank's micro-batches of chat samples, in a seeded order that depends only on the step.

    Position p of the global order is sample `perm_e[p % n]` with `perm_e` a seeded permutation per epoch
    `e = p // n`; ranks take their slice of each global batch as in pretraining (`micro_batch_positions`), so a
    resume on another number of workers reads the same samples. Samples of one micro-batch are right-padded
    with masked positions.

    Args:
        encoded (list): `(ids, mask)` pairs from `encode_chat_samples`.
        cfg (BatchConfig): batch shape. rank, world_size (int): this worker's place.
        device (torch.device): where the tensors go. seed (int): the order.
    """

    def __init__(self, encoded, cfg: BatchConfig, rank: int, world_size: int, device, seed: int = 0):
        self.encoded, self.cfg, self.rank, self.world_size = encoded, cfg, rank, world_size
        self.device, self.seed = device, seed
        self.wait_s = 0.0

    def sample_index(self, position: int) -> int:
        n = len(self.encoded)
        epoch, offset = divmod(position, n)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(perm[offset])

    def micro_batches(self, batch_index: int):
        for positions in micro_batch_positions(batch_index, self.cfg, self.rank, self.world_size):
            t0 = time.perf_counter()
            ids = [self.sample_index(p) for p in positions]
            length = max(len(self.encoded[i][0]) for i in ids)
            tokens = torch.zeros(len(ids), length, dtype=torch.long)  # (B, T+1), padding masked out below
            mask = torch.zeros(len(ids), length, dtype=torch.long)
            for row, i in enumerate(ids):
                sample, sample_mask = self.encoded[i]
                tokens[row, : len(sample)] = torch.tensor(sample)
                mask[row, : len(sample)] = torch.tensor(sample_mask)
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            self.wait_s += time.perf_counter() - t0
            yield ChatMicroBatch(tokens[:, :-1], tokens[:, 1:], mask[:, 1:], torch.tensor(ids, dtype=torch.long))

    def take_wait(self) -> float:
        waited, self.wait_s = self.wait_s, 0.0
        return waited


@dataclass
class FinetuneTask:
    """The fine-tune's `TrainJob.task`: base weights, chat data and the segmented loss (pickled to workers).

    Args:
        chat_data (str): chat JSONL every worker can read, in a shape of `rwkv5.train.chat_formats`.
        init_checkpoint (str, optional): base model, a native checkpoint (a milestone's model.safetensors)
            or an RWKV-LM `.pth`; None keeps the fresh initialisation (tests). Default: None.
        segment_len (int): tokens per state-passing segment. Default: DEFAULT_SEGMENT_LEN.
        vocab_path (str, optional): tokenizer vocabulary. Default: the RWKV World vocabulary.
        heldout (int): samples of `rwkv5.train.chat.heldout_split` left out of training, for the evaluation to
            score. Default: 0 (train on all).
    """

    chat_data: str
    init_checkpoint: str | None = None
    segment_len: int = DEFAULT_SEGMENT_LEN
    vocab_path: str | None = None
    heldout: int = 0

    def init_model(self, model) -> None:
        """Copy the base checkpoint's weights into `model`; its config must be the run's model config."""
        if self.init_checkpoint is None:
            return
        from rwkv5.checkpoint import load_rwkv_pth, read_checkpoint

        if str(self.init_checkpoint).endswith(".pth"):
            base = load_rwkv_pth(self.init_checkpoint, "cpu", torch.float32)
            state_dict, config = base.state_dict(), base.cfg
        else:
            state_dict, config, _ = read_checkpoint(self.init_checkpoint)
        if config != model.cfg:
            raise CheckpointError(
                f"{self.init_checkpoint}: base model config {config.model_dump()} differs from the fine-tune "
                f"run's model config {model.cfg.model_dump()}"
            )
        with torch.no_grad():
            model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)

    def batches(self, cfg: RunConfig, rank: int, world_size: int, device) -> ChatBatches:
        from data_prep.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.vocab_path)
        train, _ = heldout_split(read_chat_jsonl(self.chat_data), self.heldout)
        encoded = encode_chat_samples(train, tokenizer.encode, cfg.batch.ctx_len)
        return ChatBatches(encoded, cfg.batch, rank, world_size, device, cfg.seed)

    def loss(self, engine, mb: ChatMicroBatch) -> torch.Tensor:
        # The DeepSpeed engine's module: ZeRO-2 hooks gradients, not the forward, so calling the module
        # segment by segment (and again in recomputation) is what engine(...) would do.
        module = getattr(engine, "module", engine)
        return segmented_loss(module, mb.inputs, mb.targets, mb.mask, self.segment_len)


def finetune(config: RunConfig, task: FinetuneTask, run_name: str, storage: str | Path, *, workers: int = 0,
             gpus_per_worker: float = 0, resume: bool = False, callbacks=()) -> dict:
    """Fine-tune as training run `run_name` (checkpoints in storage/run_name), in this process or on Ray Train
    workers (`rwkv5.train.launch.run_training` decides by `workers`); returns the final metrics."""
    from rwkv5.train.launch import run_training

    # Ray workers may start in another directory: give them absolute paths.
    task = replace(task, chat_data=str(Path(task.chat_data).resolve()),
                   init_checkpoint=None if task.init_checkpoint is None else str(Path(task.init_checkpoint).resolve()))
    return run_training(config, run_name, task.chat_data, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                        resume=resume, callbacks=list(callbacks), task=task)


def finetune_milestone(base: str, storage: str | Path, run_name: str, chat_data: str | None = None,
                       steps: int = 10, lr: float = 1e-4, max_len: int = 1024, workers: int = 0,
                       gpus_per_worker: float = 0, heldout: int = DEFAULT_HELDOUT) -> dict:
    """Chat SFT of a milestone checkpoint `base` as run `run_name`: the milestone flow's fine-tune.

    A finished fine-tune is reused and an interrupted one resumes from its checkpoint, so a retried flow run
    trains no step twice. It never trains on the `heldout` samples of `rwkv5.train.chat.heldout_split`, which
    `rwkv5.eval.evaluate.evaluate_saved(..., chat_data=..., chat_heldout=heldout)` scores before and after.

    Args:
        chat_data: a local chat JSONL (`rwkv5.train.chat.resolve_chat_data` makes one of a URL). Default: a
            small chat set built from local docstrings, in `storage`.

    Returns:
        `{"checkpoint": the tuned model, "chat_data": the chat file used, "heldout", "first_loss",
        "last_loss", "steps"}` (first and last batch losses are of different samples: progress is the
        held-out chat loss).
    """
    from data_prep.chat_sample import build_chat_sample
    from rwkv5.checkpoint import read_checkpoint_config
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.milestones import read_done
    from rwkv5.train.trace import read_trace

    run_dir = Path(storage) / run_name
    trace = run_dir / "trace.jsonl"
    chat = chat_data or str(build_chat_sample(Path(storage) / "chat-sample.jsonl"))
    if read_done(run_dir, 1) is None:  # the fine-tune's one milestone is its last step
        model_cfg, _ = read_checkpoint_config(base)
        cfg = finetune_run_config(model_cfg, steps=steps, samples_per_step=max(2, workers), max_len=max_len, lr=lr,
                                  final_lr=lr / 10, warmup_steps=0)
        task = FinetuneTask(chat_data=chat, init_checkpoint=base, heldout=heldout)
        finetune(cfg, task, run_name, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                 resume=bool(list_checkpoints(run_dir)), callbacks=[TraceCallback(trace)])
    rows = read_trace(trace)
    return {"checkpoint": read_done(run_dir, 1)["path"], "chat_data": chat, "heldout": heldout,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "steps": len(rows)}
