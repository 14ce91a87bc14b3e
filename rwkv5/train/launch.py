"""Start (or join) Ray and run the training function on N workers with Ray Train's TorchTrainer.

Ray 2.60 is Train V2: a run resumes when a new TorchTrainer gets the same `RunConfig(name, storage_path)`
(`restore()` raises), so the run name is the resume key. Because that resume would otherwise be silent,
`launch` refuses a name that already has checkpoints unless `resume=True`.
"""

from __future__ import annotations

import os
from pathlib import Path

from rwkv5.errors import ConfigError
from rwkv5.train.callbacks import Callback
from rwkv5.train.checkpoint import list_checkpoints
from rwkv5.train.config import RunConfig
from rwkv5.train.worker import OFFLINE_ENV, TrainJob, ray_train_fn

__all__ = ["launch", "check_resume", "ensure_ray"]

# Variables the workers need from the driver's environment.
_FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "PREFECT_API_URL",
                  "RWKV5_WKV_BACKEND", "HF_HUB_DISABLE_TELEMETRY")


def check_resume(storage_path: str | Path, run_name: str, resume: bool) -> list[Path]:
    """The run's complete checkpoints; raises if there are some and `resume` is off (no silent resume)."""
    found = list_checkpoints(Path(storage_path) / run_name)
    if found and not resume:
        raise ConfigError(
            f"run {run_name!r} already has {len(found)} checkpoint(s) under {Path(storage_path) / run_name} "
            f"(latest {found[-1].name}): pass --resume to continue it, or pick another --run-name"
        )
    return found


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
    gpus_per_worker: int = 0,
    resume: bool = False,
    init_missing: bool = False,
    callbacks: list[Callback] | None = None,
    max_failures: int = 3,
    ray_address: str | None = None,
):
    """Run (or resume) pretraining run `run_name` on `workers` Ray workers; returns Ray's `Result`.

    Args:
        config (RunConfig): the run preset.
        run_name (str): the resume key; checkpoints go to storage_path/run_name.
        data_dir: dataset directory every worker can read.
        storage_path: checkpoint root every worker can write (local disk or NFS).
        workers (int): data-parallel workers. Default: 1.
        gpus_per_worker (int): 0 runs on CPU with gloo; 1 gives each worker a GPU and NCCL. Default: 0.
        resume (bool): continue a run that has checkpoints. Default: False.
        init_missing (bool): resume from a checkpoint lacking parameters (surgery). Default: False.
        callbacks (list[Callback]): extra hooks run on every worker. Default: none.
        max_failures (int): worker-group restarts from the last checkpoint before giving up. Default: 3.
        ray_address (str, optional): a cluster to join. Default: this process's Ray, RAY_ADDRESS, or a new one.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    config.batch.grad_accum(workers)
    storage_path = Path(storage_path).resolve()
    check_resume(storage_path, run_name, resume)
    ensure_ray(ray_address)
    job = TrainJob(config=config, run_name=run_name, data_dir=str(Path(data_dir).resolve()),
                   storage_path=str(storage_path), init_missing=init_missing, callbacks=list(callbacks or []))
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
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
