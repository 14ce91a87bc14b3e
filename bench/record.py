"""Where a memory bench runs, what its record says about that, and how the record is written.

Needs only torch (and the repo root on sys.path for `data_prep.atomic`), like the scripts that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text

__all__ = ["ROOT", "bench_device", "card_slug", "environment", "write_record"]

ROOT = Path(__file__).resolve().parents[1]


def bench_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """`args.device`, after forcing the WKV op to `args.wkv_backend` (when given) for the whole process.

    Exits through `parser.error` when CUDA is asked for and absent.
    """
    if args.wkv_backend:
        os.environ["RWKV5_WKV_BACKEND"] = args.wkv_backend
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --tiny for a smoke run")
    return device


def card_slug(device: torch.device | str) -> str:
    """A short name for the device in file names: "h100", "h200" for NVIDIA's cards, "cpu" off the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    model = re.search(r"\b([a-z]{1,2}\d{2,4})\b", name)
    return model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device | str, script: str, argv: list[str] | None = None) -> dict:
    """The command, date, device, library versions and commit of this run.

    Args:
        device: where the run measures.
        script: the bench script's `__file__`.
        argv: its arguments, as given to its `main`. Default: `sys.argv[1:]`.
    """
    device = torch.device(device)
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python3", Path(script).resolve().relative_to(ROOT).as_posix(), *args]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "card": card_slug(device),
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _commit(),
    }


def write_record(path: str | Path, record: dict) -> Path:
    """Write `record` as indented JSON to `path` (atomically: a reader never sees half a file)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
