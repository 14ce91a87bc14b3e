"""Start (or join) Ray and run the training function on N workers with Ray Train's TorchTrainer.

Ray 2.60 is Train V2: a run resumes when a new TorchTrainer gets the same `RunConfig(name, storage_path)`
(`restore()` raises), so the run name is the resume key. Because that resume would otherwise be silent,
`launch` refuses a name that already has checkpoints unless `resume=True`.

`storage_path` and `data_dir` may be URIs (`s3://bucket/runs`, any pyarrow/fsspec filesystem): Ray Train
uploads checkpoints there and workers download the one they resume from; shards stream through a node-local
cache (`data_prep.remote`). Milestone files and markers, which the milestone flow reads as files, then go
under `local_dir` (a shared path on a cluster).
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.remote import filesystem, is_remote
from rwkv5.errors import ConfigError, Rwkv5Error
from rwkv5.train.callbacks import Callback
from rwkv5.train.checkpoint import list_checkpoints
from rwkv5.train.config import RunConfig
from rwkv5.train.worker import OFFLINE_ENV, TrainJob, ray_train_fn, train

__all__ = ["run_training", "TrainingFailed", "launch", "train_here", "check_resume", "ensure_ray"]

# Variables the workers need from the driver's environment.
# Object-store settings are forwarded, credentials are not: clusters use instance roles or their own env.
_FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "PREFECT_API_URL",
                  "RWKV5_WKV_BACKEND", "HF_HUB_DISABLE_TELEMETRY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "RWKV5_SHARD_CACHE", "RWKV5_SHARD_CACHE_BYTES")


# Ray Train settings a launch sets unless the environment already has them. The controller polls its workers
# every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and only then sees that the training function has
# returned, so each launch ended up to 2 s after its work (1-2 s measured, bench/pause_overhead.py), twice per
# `shared`-mode pause (the fine-tune and the pretraining relaunch). A poll is one small actor call.
_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _remote_checkpoints(run_uri: str) -> list[str]:
    """`step_*` folders under a run URI that hold a trainer state (Ray writes it last), oldest first."""
    import pyarrow.fs as pafs

    from rwkv5.train.checkpoint import STATE_FILE

    fs, base = filesystem(run_uri)
    entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    steps = sorted(e.base_name for e in entries if e.base_name.startswith("step_"))
    return [f"{run_uri}/{name}" for name in steps
            if fs.get_file_info(f"{base}/{name}/{STATE_FILE}").type == pafs.FileType.File]


def check_resume(storage_path: str | Path, run_name: str, resume: bool) -> list[Path] | list[str]:
    """The run's complete checkpoints; raises if there are some and `resume` is off (no silent resume)."""
    if is_remote(storage_path):
        run_dir = f"{str(storage_path).rstrip('/')}/{run_name}"
        found = _remote_checkpoints(run_dir)
    else:
        run_dir = Path(storage_path) / run_name
        found = list_checkpoints(run_dir)
    if found and not resume:
        raise ConfigError(
            f"run {run_name!r} already has {len(found)} checkpoint(s) under {run_dir} "
            f"(latest {str(found[-1]).rsplit('/', 1)[-1]}): pass --resume to continue it, or pick another --run-name"
        )
    return found


def check_gpus_per_worker(gpus: float) -> None:
    """Ray's rule for GPU requests: whole GPUs, or one fraction of a single GPU (0.5 lets two runs share it)."""
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(f"gpus_per_worker must be 0, a fraction of one GPU or a whole number, got {gpus}")


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray of this process if started, else join `address` / RAY_ADDRESS, else start a local one."""
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def launch(
    config: RunConfig,
    run_name: str,
    data_dir: str | Path,
    storage_path: str | Path,
    workers: int = 1,
    gpus_per_worker: float = 0,
    resume: bool = False,
    init_missing: bool = False,
    callbacks: list[Callback] | None = None,
    max_failures: int = 3,
    ray_address: str | None = None,
    local_dir: str | Path | None = None,
    task=None,
):
    """Run (or resume) pretraining run `run_name` on `workers` Ray workers; returns Ray's `Result`.

    Args:
        config (RunConfig): the run preset.
        run_name (str): the resume key; checkpoints go to storage_path/run_name.
        data_dir: dataset directory every worker can read (shared path or URI such as s3://bucket/tokens).
        storage_path: checkpoint root every worker can write (shared path, or a URI such as s3://bucket/runs).
        workers (int): data-parallel workers. Default: 1.
        gpus_per_worker (float): 0 runs on CPU with gloo; 1 gives each worker a GPU and NCCL. A fraction
            (0.5) shares a GPU: on one GPU, pretraining and the milestone fine-tunes run side by side. Default: 0.
        resume (bool): continue a run that has checkpoints. Default: False.
        init_missing (bool): resume from a checkpoint lacking parameters (surgery). Default: False.
        callbacks (list[Callback]): extra hooks run on every worker. Default: none.
        max_failures (int): worker-group restarts from the last checkpoint before giving up. Default: 3.
        ray_address (str, optional): a cluster to join. Default: this process's Ray, RAY_ADDRESS, or a new one.
        local_dir (path, optional): with a URI storage_path, where milestone files go. Default:
            $RWKV5_HOME/runs (./.state/runs).
        task (optional): train on this instead of token shards (`TrainJob.task`; fine-tuning). Default: None.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    check_gpus_per_worker(gpus_per_worker)
    config.batch.grad_accum(workers)
    storage = _location(storage_path)
    check_resume(storage, run_name, resume)
    ensure_ray(ray_address)
    if is_remote(storage):
        files_root = Path(local_dir or Path(os.environ.get("RWKV5_HOME", ".state")) / "runs").resolve()
    else:
        files_root = Path(storage)
    job = TrainJob(config=config, run_name=run_name, data_dir=_location(data_dir), storage_path=str(files_root),
                   init_missing=init_missing, callbacks=list(callbacks or []), task=task,
                   use_gpu=gpus_per_worker > 0)
    for key, value in _RAY_TRAIN_ENV.items():  # read by the controller: TorchTrainer passes it on from here
        os.environ.setdefault(key, value)
    env = dict(OFFLINE_ENV) | {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1} | ({"GPU": gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()


def train_here(
    config: RunConfig,
    run_name: str,
    data_dir: str | Path,
    storage_path: str | Path,
    resume: bool = False,
    callbacks: list[Callback] | None = None,
    use_gpu: bool = False,
    init_missing: bool = False,
    task=None,
):
    """Run (or resume) pretraining run `run_name` as one worker in this process; returns its TrainerState.

    The same training loop, checkpoints, milestones and resume rules as `launch` with `workers=1`, without
    Ray: for the CPU demo, where a Ray Train launch (a controller, helper actors and a worker, each a process
    importing Ray, torch and DeepSpeed) costs far more than the tiny run itself.
    Local storage only (Ray Train is what moves checkpoints to and from object stores).
    """
    if is_remote(storage_path) or is_remote(data_dir):
        raise ConfigError(f"train_here needs local paths; got {storage_path} and {data_dir}: use launch()")
    config.batch.grad_accum(1)
    storage = _location(storage_path)
    check_resume(storage, run_name, resume)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import torch.distributed as dist

    if not dist.is_initialized() and "TORCHELASTIC_RUN_ID" not in os.environ:
        # One process (torchrun's processes aside, which set TORCHELASTIC_RUN_ID): a rendezvous left in the
        # environment by an earlier run must not be joined; the worker picks a free port for a group of one.
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    return train(TrainJob(config=config, run_name=run_name, data_dir=_location(data_dir), storage_path=storage,
                          init_missing=init_missing, callbacks=list(callbacks or []), task=task, use_gpu=use_gpu))


class TrainingFailed(Rwkv5Error):
    """Ray Train gave up on a run (its workers failed more often than `max_failures`)."""


def run_training(
    config: RunConfig,
    run_name: str,
    data_dir: str | Path,
    storage_path: str | Path,
    *,
    workers: int = 0,
    gpus_per_worker: float = 0,
    resume: bool = False,
    init_missing: bool = False,
    callbacks: list[Callback] | None = None,
    task=None,
) -> dict:
    """Run (or resume) a training run where `workers` says; the one place that chooses Ray Train or not.

    `workers` == 0 trains in this process (`train_here`): the CPU demo and the milestone fine-tunes of small
    runs, where starting Ray Train's controller, helper actors and workers costs far more than the run.
    `workers` >= 1 runs them through Ray Train (`launch`: RAY_ADDRESS's cluster, this process's Ray, or a
    new local one). Returns the final metrics (`step`, `tokens_seen`, and the last step's metrics).

    Raises:
        TrainingFailed: Ray Train gave up on the run.
    """
    if workers == 0:
        state = train_here(config, run_name, data_dir, storage_path, resume=resume, callbacks=callbacks,
                           use_gpu=gpus_per_worker > 0, init_missing=init_missing, task=task)
        return {"step": state.step, "tokens_seen": state.tokens_seen, "applied": state.applied}
    result = launch(config, run_name, data_dir, storage_path, workers=workers, gpus_per_worker=gpus_per_worker,
                    resume=resume, init_missing=init_missing, callbacks=callbacks, task=task)
    if result.error is not None:
        raise TrainingFailed(f"run {run_name!r} failed: {result.error}")
    return dict(result.metrics or {})


def _location(path: str | Path) -> str:
    """An absolute local path, or a URI as given (minus a trailing slash)."""
    return str(path).rstrip("/") if is_remote(path) else str(Path(path).resolve())
