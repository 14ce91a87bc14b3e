"""Milestones: at every `milestones.fraction` of the token budget, a consolidated bf16 checkpoint at a stable path.

The file holds the weights of the step just checkpointed, cast to bf16 (`write_weights`), written atomically to
`<run>/milestones/m{index:03d}/model.safetensors`, and then the `on_milestone` hooks run. A `done.json` marker
written after the hooks makes each milestone fire once, also when the process dies in between and the run
restarts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text
from rwkv5.config import ModelConfig

__all__ = ["crossed", "percent_of", "milestone_dir", "is_done", "mark_done", "read_done", "completed", "run_dir_of",
           "write_weights"]


def crossed(tokens_seen: int, token_budget: int, fraction: float) -> list[int]:
    """1-based indices of the milestones passed at `tokens_seen` (milestone i at i * fraction * budget)."""
    count = int(math.floor(1.0 / fraction + 1e-9))
    return [i for i in range(1, count + 1) if tokens_seen >= round(i * fraction * token_budget)]


def percent_of(index: int, fraction: float) -> int:
    """Milestone `index` in whole percent of the token budget: the name the milestone flows and releases use."""
    return round(100 * index * fraction)


def milestone_dir(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / "milestones" / f"m{index:03d}"


def run_dir_of(milestone_checkpoint: str | Path) -> Path:
    """The run folder of a milestone checkpoint (`milestone_dir(run_dir, i) / "model.safetensors"`)."""
    return Path(milestone_checkpoint).parent.parent.parent


def is_done(run_dir: str | Path, index: int) -> bool:
    return (milestone_dir(run_dir, index) / "done.json").is_file()


def mark_done(run_dir: str | Path, index: int, info: dict) -> None:
    """Record milestone `index` as complete: its checkpoint is written and its hooks have run."""
    atomic_write_text(milestone_dir(run_dir, index) / "done.json", json.dumps(info))


def read_done(run_dir: str | Path, index: int) -> dict | None:
    """Milestone `index`'s record (path, step, tokens_seen, percent), or None while it is not complete."""
    path = milestone_dir(run_dir, index) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def completed(run_dir: str | Path) -> list[dict]:
    """The records of every complete milestone of a run, in percent order."""
    rows = [json.loads(done.read_text()) for done in (Path(run_dir) / "milestones").glob("m*/done.json")]
    return sorted((row for row in rows if row.get("percent") is not None), key=lambda row: row["percent"])


def write_weights(state_dict: dict[str, torch.Tensor], out_dir: Path, model_cfg: ModelConfig, meta: dict) -> Path:
    """Save the training module's weights, cast to bf16, as a native checkpoint (rwkv5.checkpoint).

    Under ZeRO-2 every rank holds all the weights, and after each step they are the fp32 master weights cast
    to the training dtype, so this equals consolidating the step's DeepSpeed checkpoint and casting it
    (`tests/rwkv5/train/test_train_here.py` checks it). It reads nothing back: consolidating loaded every
    rank's optimizer shard into one process's memory (~90 GB for the 7b) and took seconds per milestone even
    for the 169m, while pretraining waits in `shared` mode.
    """
    from rwkv5.checkpoint import save_state_dict

    bf16 = {name: t.detach().to("cpu", torch.bfloat16) for name, t in state_dict.items()}
    return save_state_dict(bf16, model_cfg, Path(out_dir) / "model.safetensors", meta)
