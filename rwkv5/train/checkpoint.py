"""Training checkpoints: DeepSpeed's sharded ZeRO files plus our client state, in a store that never lets a
half-written checkpoint replace the last complete one.

Layout of one checkpoint directory:
    ds/mp_rank_00_model_states.pt, ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt   (DeepSpeed, tag "ds")
    trainer_state.json     step, tokens, counters, world size, milestones (also in DeepSpeed's client state)
    param_shapes.json      {parameter name: shape}: compared against the model before anything is loaded

Two stores: `RayStore` writes each rank's files to a local temporary folder and hands them to
`ray.train.report`, which merges all ranks into one directory of the run's storage and registers it only
once every rank has uploaded (Ray keeps the last N). `LocalStore` (no Ray: torchrun or one process)
writes into `<run>/checkpoints/.partial-step_N`, and rank 0 renames it to `step_N` after a barrier.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import atomic_write_text
from rwkv5.errors import CheckpointError

__all__ = [
    "TAG",
    "TrainerState",
    "save_engine_state",
    "load_engine_state",
    "read_trainer_state",
    "read_param_shapes",
    "compare_params",
    "RayStore",
    "LocalStore",
    "list_checkpoints",
]

TAG = "ds"
STATE_FILE = "trainer_state.json"
SHAPES_FILE = "param_shapes.json"


@dataclass
class TrainerState:
    """Everything besides weights and optimizer moments that a resumed run needs to continue exactly.

    Step s always reads global batch s, so `step` is also the data-loader position (in global batches).
    """

    step: int = 0
    """Optimizer steps attempted (applied, skipped or rolled over); the next step reads global batch `step`."""
    tokens_seen: int = 0
    applied: int = 0
    skipped_nonfinite: int = 0
    skipped_spikes: int = 0
    rollbacks: int = 0
    milestones_fired: list[int] = field(default_factory=list)
    world_size: int = 1
    spike: dict = field(default_factory=dict)
    """The spike detector's loss window."""
    callbacks: dict = field(default_factory=dict)
    """State of stateful callbacks by name (e.g. the MLflow run id)."""

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_engine_state(engine, save_dir: str | Path, state: TrainerState, rank: int) -> None:
    """Write a DeepSpeed checkpoint with our client state into `save_dir` (collective: every rank calls)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    client = {"trainer": asdict(state), "rng": _rng_state()}
    engine.save_checkpoint(str(save_dir), tag=TAG, client_state=client)
    if rank == 0:
        shapes = {n: list(p.shape) for n, p in engine.module.named_parameters()}
        atomic_write_text(save_dir / SHAPES_FILE, json.dumps(shapes))
        atomic_write_text(save_dir / STATE_FILE, json.dumps(asdict(state), indent=1))


def read_trainer_state(ckpt_dir: str | Path) -> TrainerState:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return TrainerState.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable trainer state ({exc})") from None


def read_param_shapes(ckpt_dir: str | Path) -> dict[str, list[int]]:
    path = Path(ckpt_dir) / SHAPES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable parameter list ({exc})") from None


def compare_params(model: torch.nn.Module, saved: dict[str, list[int]]) -> tuple[list[str], list[str], list[str]]:
    """(missing from the checkpoint, unexpected in it, shape mismatches) against `model`'s parameters."""
    current = {n: list(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = sorted(n for n in set(current) & set(saved) if current[n] != saved[n])
    return missing, unexpected, mismatched


def load_engine_state(engine, ckpt_dir: str | Path, strict: bool = True) -> TrainerState:
    """Load weights, optimizer partitions, client state and RNG into an initialised engine (collective)."""
    path, client = engine.load_checkpoint(
        str(ckpt_dir), tag=TAG, load_module_strict=strict, load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None or client is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint with tag {TAG!r}")
    _set_rng_state(client["rng"])
    return TrainerState.from_dict(client["trainer"])


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: `step_*` folders (Ray's or ours) with a trainer state."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("step_*") if (p / STATE_FILE).is_file() and (p / TAG).is_dir()]
    found += [p for p in (run_dir / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: read_trainer_state(p).step)


class RayStore:
    """Checkpoints through `ray.train.report`: Ray merges the ranks' folders and keeps the last N."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank
        self._last: Path | None = None

    def latest(self) -> Path | None:
        import ray.train

        if self._last is not None and self._last.is_dir():
            return self._last
        ckpt = ray.train.get_checkpoint()  # Train V2: the latest persisted one, also after our own reports
        if ckpt is None:
            return None
        if os.path.isdir(ckpt.path):
            return Path(ckpt.path)
        return _download(ckpt)

    def save(self, engine, state: TrainerState, metrics: dict) -> None:
        import ray.train

        local = Path(tempfile.mkdtemp(prefix=f"rwkv5-ckpt-r{self.rank}-"))
        try:
            save_engine_state(engine, local, state, self.rank)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                checkpoint_dir_name=_step_name(state.step),
            )
            self._last = self.run_dir / _step_name(state.step)
        finally:
            shutil.rmtree(local, ignore_errors=True)


class LocalStore:
    """Checkpoints in `<run_dir>/checkpoints/step_N` on a filesystem all ranks share (no Ray)."""

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep_last = rank, keep_last

    def latest(self) -> Path | None:
        done = [p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file()]
        return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)

    def save(self, engine, state: TrainerState, metrics: dict) -> None:
        final = self.root / _step_name(state.step)
        partial = self.root / f".partial-{final.name}"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        save_engine_state(engine, partial, state, self.rank)
        _barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            done = sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())
            for old in done[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


def _download(ckpt) -> Path:
    """A local copy of a checkpoint on object storage, shared by the ranks of a node (atomic rename).

    Every rank needs the whole folder only for universal resume and milestones, but DeepSpeed's loader
    expects one directory, so each node keeps one copy of the latest checkpoint and drops older ones.
    """
    import hashlib

    cache = Path(tempfile.gettempdir()) / "rwkv5-checkpoints"
    key = hashlib.sha256(f"{ckpt.filesystem.type_name}:{ckpt.path}".encode()).hexdigest()[:16]
    final = cache / f"{Path(ckpt.path).name}-{key}"
    if (final / STATE_FILE).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    try:
        ckpt.to_directory(str(partial))
        if not (partial / STATE_FILE).is_file():
            raise CheckpointError(f"{ckpt.path}: downloaded checkpoint has no {STATE_FILE}")
        try:
            os.replace(partial, final)
        except OSError:  # another rank of this node renamed its copy first
            if not (final / STATE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for old in cache.glob("step_*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
