"""How to resume: straight from a DeepSpeed checkpoint, or through a universal checkpoint when the worker
count changed or the model gained parameters (`--init-missing`).

A DeepSpeed ZeRO-2 checkpoint stores the optimizer as flat per-rank partitions, which only fit the same
world size and the same parameter list. `ds_to_universal --inject_missing_state` rewrites it as one folder per
parameter (`zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt`), which DeepSpeed loads at any world
size. Model surgery adds folders for the missing parameters: their fp32 value from the freshly initialised
model and zero moments, which is exactly a fresh optimizer state for them; every other parameter keeps its
trained value and moments.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rwkv5.errors import CheckpointError
from rwkv5.train.checkpoint import TAG, compare_params, read_param_shapes, read_trainer_state

__all__ = ["ResumePlan", "plan_resume", "to_universal", "inject_fresh_params"]


@dataclass
class ResumePlan:
    load_dir: Path | None
    """Directory to give `load_engine_state` (holding tag folder `ds`), or None for a fresh start."""
    universal: bool = False
    strict: bool = True
    scratch: Path | None = None
    """Converted copy to delete once loaded."""

    def cleanup(self) -> None:
        if self.scratch is not None:
            if dist.is_initialized():
                dist.barrier()
            if _local_rank() == 0:
                shutil.rmtree(self.scratch, ignore_errors=True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def plan_resume(model: torch.nn.Module, ckpt_dir: Path | None, world_size: int, init_missing: bool,
                rank: int, seed: int) -> ResumePlan:
    """Compare the checkpoint with `model` (freshly initialised) and prepare what DeepSpeed should load.

    Raises:
        CheckpointError: parameters differ and `init_missing` is off (the message lists the keys), or a
            parameter changed shape (never mended).
    """
    if ckpt_dir is None:
        return ResumePlan(None)
    missing, unexpected, mismatched = compare_params(model, read_param_shapes(ckpt_dir))
    if mismatched:
        raise CheckpointError(f"{ckpt_dir}: parameters changed shape, cannot resume: {', '.join(mismatched)}")
    if (missing or unexpected) and not init_missing:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint does not match the model (resume with --init-missing to initialise "
            f"new parameters fresh); missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'}"
        )
    saved_world = read_trainer_state(ckpt_dir).world_size
    if saved_world == world_size and not missing and not unexpected:
        return ResumePlan(Path(ckpt_dir))
    digest = hashlib.sha1(f"{Path(ckpt_dir).resolve()}:{world_size}".encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"rwkv5-universal-{digest}"
    if _local_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        to_universal(Path(ckpt_dir) / TAG, scratch / TAG)
        if missing:
            named = dict(model.named_parameters())
            inject_fresh_params(scratch / TAG, {n: named[n].detach() for n in missing})
    if dist.is_initialized():
        dist.barrier()
    return ResumePlan(scratch, universal=True, strict=not (missing or unexpected), scratch=scratch)


def to_universal(tag_dir: Path, out_tag_dir: Path) -> None:
    """Run DeepSpeed's `ds_to_universal --inject_missing_state` on one checkpoint tag folder."""
    from rwkv5.train.deepspeed_import import import_deepspeed

    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(out_tag_dir), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    try:
        ds_to_universal(args)
    except Exception as exc:  # DeepSpeed raises assorted types (AssertionError, KeyError) on bad input
        raise CheckpointError(f"{tag_dir}: conversion to a universal checkpoint failed: {exc!r}") from exc


def inject_fresh_params(universal_tag_dir: Path, fresh: dict[str, torch.Tensor]) -> None:
    """Add per-parameter folders for `fresh` parameters: the given value as fp32 master, zero moments.

    The file layout (a dict with the tensor under "param" plus any metadata) is copied from an existing
    parameter's folder, so it follows whatever this DeepSpeed version wrote.
    """
    zero = universal_tag_dir / "zero"
    template_dir = next((p for p in sorted(zero.iterdir()) if (p / "fp32.pt").is_file()), None)
    if template_dir is None:
        raise CheckpointError(f"{zero}: no parameter folders to use as a template")
    for name, value in fresh.items():
        target = zero / name
        target.mkdir(parents=True, exist_ok=True)
        for file in template_dir.iterdir():
            if file.name == "step.pt":
                shutil.copy2(file, target / file.name)
                continue
            record = torch.load(file, map_location="cpu", weights_only=True)
            fp32 = value.detach().to(torch.float32).clone()
            record["param"] = fp32 if file.name == "fp32.pt" else torch.zeros_like(fp32)
            torch.save(record, target / file.name)
