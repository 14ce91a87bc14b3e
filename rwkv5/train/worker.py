"""The per-worker training function: Ray Train's TorchTrainer runs `ray_train_fn` on every worker; `train`
also runs without Ray (torchrun environment or a single process) with checkpoints in a local store.

The loop only sequences the components: data slices (`data.py`), the schedule (`lr_schedule.py`), guards
(`stability.py`), checkpoints (`checkpoint.py`), milestones (`milestones.py`) and side effects (`callbacks.py`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rwkv5.config import count_matmul_parameters
from rwkv5.errors import CheckpointError
from rwkv5.tracking import MLflowCallback
from rwkv5.train import milestones
from rwkv5.train.callbacks import (
    Callback,
    MilestoneInfo,
    SpeedCallback,
    StepInfo,
    TrainContext,
)
from rwkv5.train.checkpoint import LocalStore, RayStore, TrainerState, load_engine_state
from rwkv5.train.config import RunConfig
from rwkv5.train.data import RankBatches
from rwkv5.train.deepspeed_import import import_deepspeed
from rwkv5.train.lr_schedule import apply_lr, lr_at
from rwkv5.train.optim import build_optimizer, deepspeed_config, param_groups
from rwkv5.train.precision import apply_precision
from rwkv5.train.stability import SpikeDetector, judge_step
from rwkv5.train.surgery import plan_resume

__all__ = ["TrainJob", "train", "ray_train_fn"]

OFFLINE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


@dataclass
class TrainJob:
    """One pretraining run as the workers receive it (pickled into Ray's train_loop_config).

    Args:
        config (RunConfig): the run preset, possibly edited.
        run_name (str): the resume key; checkpoints and milestones live under storage_path/run_name.
        data_dir (str): dataset directory (manifest.json).
        storage_path (str): root of all runs' checkpoints (a path every worker sees).
        init_missing (bool): resume from a checkpoint lacking parameters by initialising them fresh.
        callbacks (list[Callback]): extra hooks; MLflow and speed hooks are added from the config.
        task (optional): what to train on instead of pretraining on `data_dir`'s token shards: an object
            with `init_model(model)` (before DeepSpeed; a resume checkpoint still wins),
            `batches(config, rank, world_size, device)` (an object like `RankBatches`) and
            `loss(engine, micro_batch) -> Tensor`. `rwkv5.train.finetune.FinetuneTask` is the chat SFT one.
    """

    config: RunConfig
    run_name: str
    data_dir: str
    storage_path: str
    init_missing: bool = False
    callbacks: list[Callback] = field(default_factory=list)
    task: Any = None
    use_gpu: bool | None = None
    """Train on CUDA: None = when a GPU is visible (one-process runs); launch sets it from gpus_per_worker,
    so a CPU run stays on CPU (gloo) on a machine that has GPUs."""

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.run_name


def ray_train_fn(train_loop_config: dict) -> None:
    """Entry point for `TorchTrainer(train_loop_per_worker=...)`: Ray has set up torch.distributed."""
    job: TrainJob = train_loop_config["job"]
    train(job, store=RayStore(job.run_dir, dist.get_rank() if dist.is_initialized() else 0))


def _setup_distributed(use_gpu: bool | None = None) -> tuple[torch.device, int, int]:
    """Pick the device and make sure a process group exists (Ray made one; torchrun/one process: make it)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if torch.cuda.is_available() if use_gpu is None else use_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    deepspeed = import_deepspeed()
    import deepspeed.ops

    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (minutes of C++ on a fresh machine);
        # gloo does the job for CPU runs, so mark that op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        alone = "WORLD_SIZE" not in os.environ  # one process, not started by torchrun
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if alone and "MASTER_PORT" not in os.environ:
            # A fixed port collides with any other one-process run on the machine (tests, milestone fine-tunes).
            os.environ["MASTER_PORT"] = str(_free_port())
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    else:
        deepspeed.init_distributed(verbose=False)
    return device, dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce(values: torch.Tensor) -> list[float]:
    """Sum over ranks and read back to the host: the step's one deliberate host sync."""
    dist.all_reduce(values)
    return values.tolist()


def _gather_ids(ids: torch.Tensor, world: int, device: torch.device) -> list[int]:
    """All ranks' sample ids in rank order, which is global position order (ranks read contiguous slices)."""
    local = ids.to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).tolist()


def _pretrain_loss(engine, mb) -> torch.Tensor:
    # The model computes head and loss in chunks of tokens: the (B, T, V) logits never exist at once.
    return engine(mb.inputs, targets=mb.targets)


def train(job: TrainJob, store=None) -> TrainerState:
    """Train until the token budget (or `stop_at_step`) is reached; returns the final trainer state.

    Collective: every rank calls it. Resumes from the store's latest checkpoint when there is one.
    """
    cfg = job.config
    device, rank, world = _setup_distributed(job.use_gpu)
    store = store or LocalStore(job.run_dir, rank, cfg.checkpoint.keep_last)
    deepspeed = import_deepspeed()

    from data_prep.loader import PackedDataset
    from rwkv5.model import build_model

    torch.manual_seed(cfg.seed)  # identical fresh init on every rank
    # On a GPU the weights are initialised there (meta, then allocated on the device): seconds for the 7B
    # instead of minutes of CPU work and a host copy per worker.
    model = build_model(cfg.model, device, activation_memory=cfg.activation_memory)
    # fp8: the block linears become float8 ones before DeepSpeed casts and flattens the weights and before the
    # blocks are compiled (the casts fuse into the compiled blocks).
    apply_precision(model, cfg, device)
    compiled = cfg.compile and device.type == "cuda"
    if compiled:
        # Compiled lazily on the first call, after DeepSpeed has cast the weights to bf16.
        model.compile_blocks(dynamic=False)
    if job.task is not None:
        job.task.init_model(model)
    plan = plan_resume(model, store.latest(), world, job.init_missing, rank, cfg.seed)
    guard = build_optimizer(param_groups(model, cfg.optim), cfg.optim, device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=guard, config=deepspeed_config(cfg, world, load_universal=plan.universal)
    )
    state = TrainerState(world_size=world)
    if plan.load_dir is not None:
        state = load_engine_state(engine, plan.load_dir, strict=plan.strict)
        state.world_size = world
        plan.cleanup()

    if job.task is None:
        dataset = PackedDataset(job.data_dir, cfg.batch.ctx_len, seed=cfg.seed)
        batches = RankBatches(dataset, cfg.batch, rank, world, device)
    else:
        batches = job.task.batches(cfg, rank, world, device)
    detector = SpikeDetector.from_config(cfg.stability)
    detector.load_state_dict(state.spike)
    callbacks = [SpeedCallback()]
    if cfg.metrics.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        callbacks.append(MLflowCallback(cfg.metrics.mlflow_tracking_uri, cfg.metrics.mlflow_experiment,
                                        cfg.metrics.system_metrics))
    callbacks += job.callbacks
    ctx = TrainContext(
        run_name=job.run_name, rank=rank, world_size=world, device=device, config=cfg,
        matmul_params=count_matmul_parameters(cfg.model), run_dir=job.run_dir,
        resumed_from_step=state.step if plan.load_dir is not None else None, model=engine.module,
        engine=engine,
    )
    for cb in callbacks:
        cb.load_state_dict(state.callbacks.get(type(cb).__name__, {}))
        cb.pre_train(ctx)

    loss_fn = _pretrain_loss if job.task is None else job.task.loss
    loop = _Loop(job, engine, guard, store, batches, detector, callbacks, state, device, rank, world, loss_fn,
                 time_first_micro_batch=compiled)
    try:
        loop.run()
    except BaseException as exc:
        for cb in callbacks:
            cb.on_error(exc)
        raise
    finally:
        for cb in callbacks:
            cb.close()
    return loop.state


class _Loop:
    """The step loop's mutable state, split into small methods so `run` reads as the sequence of a step."""

    def __init__(self, job, engine, guard, store, batches, detector, callbacks, state, device, rank, world,
                 loss_fn, time_first_micro_batch: bool = False):
        self.job, self.cfg = job, job.config
        self.engine, self.guard, self.store = engine, guard, store
        self.batches, self.detector, self.callbacks = batches, detector, callbacks
        self.state, self.device, self.rank, self.world = state, device, rank, world
        self.loss_fn = loss_fn
        self.want_ids = any(cb.wants_sample_ids for cb in callbacks)
        self.accum = self.cfg.batch.grad_accum(world)
        self.saved_step = state.step if state.step else None
        # The first micro-batch of a compiled model also compiles it: timed apart (`compile_s`) and left out of
        # that step's step_time_s.
        self.time_first = time_first_micro_batch

    def run(self) -> None:
        """Steps until the budget (or `stop_at_step`) is spent, or until a milestone with `milestones.pause`."""
        cfg = self.cfg
        end = cfg.total_steps if cfg.stop_at_step is None else min(cfg.total_steps, cfg.stop_at_step)
        self._finish_pending_milestones()
        while self.state.step < end:
            info = self._train_step()
            metrics = self._metrics(info)
            for cb in self.callbacks:
                cb.post_step(info, metrics)
            if info.step % cfg.metrics.log_every == 0 or self.state.step >= end:
                for cb in self.callbacks:
                    cb.log_metrics(info.step, metrics)
            if info.spike and cfg.stability.spike_action == "rollback":
                self._rollback(info.step)
                continue
            due = [i for i in milestones.crossed(self.state.tokens_seen, cfg.token_budget, cfg.milestones.fraction)
                   if i not in self.state.milestones_fired]
            if due:
                self.state.milestones_fired += due
                self._save(metrics)
                self._fire_milestones(due)
                if cfg.milestones.pause:
                    break
            elif self.state.step % cfg.checkpoint.every_steps == 0:
                self._save(metrics)
        if self.saved_step != self.state.step:
            self._save({"step": self.state.step, "tokens_seen": self.state.tokens_seen})

    def _train_step(self) -> StepInfo:
        cfg, engine, state = self.cfg, self.engine, self.state
        step = state.step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.total_steps, cfg.optim)
        apply_lr(self.guard, lr)
        # [finite loss sum, non-finite count] stays on the device until the last micro-batch: reading a loss
        # back per micro-batch would stall the host until the GPU catches up, every time.
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        ids, compile_s = [], None
        once = cfg.zero.reduce_once_per_step  # one coalescing block and one engine.step() (deepspeed_config)
        with engine.coalesce_grad_reduction() if once else contextlib.nullcontext():
            for i, mb in enumerate(self.batches.micro_batches(step)):
                t_mb = time.perf_counter()
                loss = self.loss_fn(engine, mb)
                value = loss.detach().to(torch.float64)
                finite = torch.isfinite(value)
                sums += torch.stack([torch.where(finite, value, 0.0), (~finite).to(torch.float64)])
                ids.append(mb.sample_ids)
                engine.backward(loss / self.accum if once else loss)  # else DeepSpeed scales by 1/accum
                if self.time_first:
                    torch.cuda.synchronize(self.device)
                    compile_s, self.time_first = time.perf_counter() - t_mb, False
                if i == self.accum - 1:
                    total, bad = _all_reduce(sums)
                    mean_loss = total / (self.accum * self.world) if bad == 0 else float("nan")
                    verdict = judge_step(mean_loss, bad > 0, self.detector, cfg.stability.spike_action)
                    self.guard.skip_next = not verdict.apply
                if not once:
                    self._engine_step()
        if once:
            self._engine_step()
        self.guard.skip_next = False
        applied = verdict.apply and not getattr(engine.optimizer, "overflow", False)
        grad_norm = engine.get_global_grad_norm()
        nonfinite_step = verdict.nonfinite or (verdict.apply and not applied)
        state.step += 1
        state.tokens_seen = state.step * cfg.tokens_per_step
        state.applied += int(applied)
        state.skipped_nonfinite += int(nonfinite_step)
        state.skipped_spikes += int(verdict.spike and not verdict.apply)
        sample_ids = _gather_ids(torch.cat(ids), self.world, self.device) if self.want_ids else None
        return StepInfo(
            step=step, loss=mean_loss, lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens_seen=state.tokens_seen, step_time_s=time.perf_counter() - t0 - (compile_s or 0.0),
            compile_s=compile_s,
            data_wait_s=self.batches.take_wait(), applied=applied, nonfinite=nonfinite_step,
            spike=verdict.spike, sample_ids=sample_ids,
        )

    def _engine_step(self) -> None:
        # Named for profiles (bench/profile_step.py); a range costs microseconds when no profiler runs.
        with torch.profiler.record_function("rwkv5.optimizer_step"):
            self.engine.step()

    def _metrics(self, info: StepInfo) -> dict[str, float]:
        s = self.state
        metrics = {
            "loss": info.loss, "lr": info.lr, "tokens_seen": info.tokens_seen,
            "skipped_nonfinite": s.skipped_nonfinite, "skipped_spikes": s.skipped_spikes,
            "rollbacks": s.rollbacks,
        }
        if info.grad_norm is not None:
            metrics["grad_norm"] = info.grad_norm
        return metrics

    def _save(self, metrics: dict) -> None:
        self.state.spike = self.detector.state_dict()
        self.state.callbacks = {type(cb).__name__: cb.state_dict() for cb in self.callbacks if cb.state_dict()}
        finite = {k: float(v) for k, v in metrics.items() if v == v}
        self.store.save(self.engine, self.state, finite | {"step": self.state.step})
        self.saved_step = self.state.step
        for cb in self.callbacks:
            cb.post_checkpoint_saved(self.state.step)

    def _rollback(self, bad_step: int) -> None:
        """Reload the last checkpoint and continue after the offending step, skipping the data in between."""
        latest = self.store.latest()
        current = self.state
        if latest is None:
            return
        restored = load_engine_state(self.engine, latest)
        restored_step = restored.step
        restored.step = bad_step + 1
        restored.tokens_seen = restored.step * self.cfg.tokens_per_step
        restored.skipped_nonfinite = current.skipped_nonfinite
        restored.skipped_spikes = current.skipped_spikes
        restored.rollbacks = current.rollbacks + 1
        restored.milestones_fired = sorted(set(current.milestones_fired) | set(restored.milestones_fired))
        restored.world_size = self.world
        self.state = restored
        for cb in self.callbacks:
            cb.post_rollback(bad_step, restored_step)

    def _fire_milestones(self, indices: list[int]) -> None:
        """Rank 0 writes the weights of the checkpoint just saved and runs the hooks; a marker makes each fire once."""
        run_dir, ckpt = self.job.run_dir, self.store.latest()
        for index in indices:
            if self.rank == 0 and not milestones.is_done(run_dir, index):
                self._write_milestone(index, ckpt)
            dist.barrier()

    def _write_milestone(self, index: int, ckpt: Path | None) -> None:
        if ckpt is None:
            raise CheckpointError(f"milestone {index}: no checkpoint of its step under {self.job.run_dir}")
        meta = {"run_name": self.job.run_name, "milestone": index,
                "percent": milestones.percent_of(index, self.cfg.milestones.fraction), "step": self.state.step,
                "tokens_seen": self.state.tokens_seen}
        path = milestones.write_weights(self.engine.module.state_dict(),
                                        milestones.milestone_dir(self.job.run_dir, index), self.cfg.model, meta)
        info = MilestoneInfo(index=index, step=self.state.step, tokens_seen=self.state.tokens_seen, path=path)
        for cb in self.callbacks:
            cb.on_milestone(info)
        milestones.mark_done(self.job.run_dir, index, meta | {"path": str(path)})

    def _finish_pending_milestones(self) -> None:
        """After a restart: milestones recorded in the checkpoint whose hooks never completed fire now."""
        pending = [i for i in self.state.milestones_fired if not milestones.is_done(self.job.run_dir, i)]
        if pending:
            self._fire_milestones(pending)

