"""Release a checkpoint: rwkv .pth (bf16) + safetensors + config, the tokenizer vocabulary, a model card and
a manifest with the sha256 of every file, written to a local folder atomically (staged, then renamed).

A release whose manifest verifies is left alone, so re-running a release is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from rwkv5.checkpoint import read_checkpoint
from rwkv5.config import count_parameters
from rwkv5.export import export_rwkv_pth, export_safetensors

__all__ = ["release_local", "verify_release", "MANIFEST"]

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_release(folder: str | Path) -> bool:
    """True when the folder's manifest exists and every file it lists has that sha256."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all((folder / f["path"]).is_file() and _sha256(folder / f["path"]) == f["sha256"]
               for f in manifest.get("files", []))


def _model_card(name: str, config, meta: dict, evals: dict) -> str:
    rows = "".join(f"| {k} | {v} |\n" for k, v in evals.items())
    return (
        f"# {name}\n\nRWKV v5.2 (Eagle, gated) language model trained by rwkv5-pipeline.\n\n"
        f"- parameters: {count_parameters(config):,}\n- layers {config.n_layer}, width {config.n_embd}, "
        f"head size {config.head_size}, FFN {config.ffn}, vocabulary {config.vocab_size}\n"
        f"- tokens seen: {meta.get('tokens_seen', 'unknown')}\n- data: {meta.get('data', 'SlimPajama')}\n\n"
        f"## Evaluation\n\n| metric | value |\n|---|---|\n{rows}\n"
        "## Files\n\n`model.pth` loads in the `rwkv` package (`RWKV(model='model', strategy='cpu fp32')`);\n"
        "`safetensors/` holds Hugging Face-named weights and config.json; `manifest.json` the sha256 of every file.\n"
    )


def release_local(
    checkpoint: str | Path, out_dir: str | Path, name: str, evals: dict | None = None,
    vocab_path: str | Path | None = None, extra_meta: dict | None = None,
) -> Path:
    """Write a release folder for a native checkpoint; returns the folder. Idempotent when it verifies."""
    out = Path(out_dir)
    if verify_release(out):
        return out
    state_dict, config, meta = read_checkpoint(checkpoint)
    meta = {**meta, **(extra_meta or {})}
    stage = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    export_rwkv_pth(state_dict, stage / "model.pth", torch.bfloat16)
    export_safetensors(state_dict, config, stage / "safetensors", torch.bfloat16)
    if vocab_path is None:
        from data_prep.tokenizer import load_tokenizer

        vocab_path = getattr(load_tokenizer(), "vocab_path", None)
    if vocab_path:
        shutil.copyfile(vocab_path, stage / Path(vocab_path).name)
    (stage / "README.md").write_text(_model_card(name, config, meta, evals or {}))
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = {
        "name": name,
        "model_config": config.model_dump(),
        "metadata": meta,
        "evals": evals or {},
        "files": [{"path": str(p.relative_to(stage)), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files],
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, out)
    return out
