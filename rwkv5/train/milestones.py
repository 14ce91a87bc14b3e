"""Milestones: at every `milestones.fraction` of the token budget, a consolidated bf16 checkpoint at a stable path.

The file is made from the DeepSpeed checkpoint saved at that step (`get_fp32_state_dict_from_zero_checkpoint`,
then cast to bf16), written atomically to `<run>/milestones/m{index:03d}/model.safetensors`, and then the
`on_milestone` hooks run. A `done.json` marker written after the hooks makes each milestone fire once, also
when the process dies in between and the run restarts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text
from rwkv5.config import ModelConfig

__all__ = ["crossed", "percent_of", "milestone_dir", "is_done", "mark_done", "read_done", "completed", "run_dir_of",
           "write_consolidated"]


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


def write_consolidated(ckpt_dir: str | Path, tag: str, out_dir: Path, model_cfg: ModelConfig, meta: dict) -> Path:
    """Consolidate a ZeRO checkpoint to fp32, cast to bf16 and save it as a native checkpoint (rwkv5.checkpoint)."""
    from rwkv5.train.deepspeed_import import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rwkv5.checkpoint import save_state_dict

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    bf16 = {name: t.to(torch.bfloat16) for name, t in fp32.items()}
    return save_state_dict(bf16, model_cfg, Path(out_dir) / "model.safetensors", meta)
