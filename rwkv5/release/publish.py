"""Release a milestone: build the release folder, upload it to a target, verify it, register it in MLflow.

A release folder holds, per variant (`base/`, and `finetune/` when given): `model.pth` (the `rwkv` package's
bf16 state dict), `model.safetensors` + `config.json` (Hugging Face RWKV5 names) with the modeling, configuration
and tokenizer code and the vocabulary that transformers loads (`rwkv5.export.export_safetensors`); shared: the
tokenizer vocabulary, `README.md` (the model card), `loss_curve.png` when a loss history is given, and `manifest.json`
with the size and sha256 of every other file.

Upload order makes a release atomic and idempotent on any target (`rwkv5.release.targets`): files that are
missing or differ go first, `manifest.json` last, so a release is complete exactly when its manifest is present
and verifies. A re-run compares the remote manifest's `inputs` fingerprint (checkpoint hashes, name, evals...)
and the remote files with the manifest; it rebuilds and uploads only when something is missing or wrong, and
then only those files. Builds are deterministic (same inputs, same bytes), so a rebuilt file matches the
manifest of an earlier, interrupted attempt.

    release("run/milestones/m010/model.safetensors", "s3://bucket/releases/run-m010", name="run-m010",
            finetune="work/m010-finetune.safetensors", evals={"base": {"val_loss": 3.1}})
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv5.checkpoint import read_checkpoint
from rwkv5.config import count_parameters
from rwkv5.errors import CheckpointError
from rwkv5.export import export_rwkv_pth, export_safetensors
from rwkv5.release.model_card import LOSS_CURVE, model_card
from rwkv5.release.targets import LocalTarget, ReleaseError, ReleaseTarget, RemoteFile, open_target
from rwkv5.tracking import check_registrable, register_release
from rwkv5.train.trace import loss_curve_png

__all__ = [
    "MANIFEST",
    "FORMAT",
    "ReleaseError",
    "PublishReport",
    "VerifyReport",
    "build_release",
    "publish_release",
    "release",
    "release_local",
    "verify_release",
    "read_manifest",
]

MANIFEST = "manifest.json"
# Recorded in every manifest; bump when the folder layout changes (2: each variant loads in transformers).
FORMAT = "rwkv5-release/2"
VARIANTS = ("base", "finetune")


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _nested_evals(evals: Mapping | None) -> dict[str, dict[str, float]]:
    """Accept {metric: value} (the base model's) or {variant: {metric: value}}."""
    if not evals:
        return {}
    if all(isinstance(v, Mapping) for v in evals.values()):
        return {k: dict(v) for k, v in evals.items()}
    return {"base": dict(evals)}


def _inputs(checkpoints: Mapping[str, Path], name: str, evals: Mapping, loss_history: Sequence | None,
            extra_meta: Mapping, vocab_path: Path | None, figures: Sequence[tuple[Path, str]] = ()) -> dict:
    """Everything a build depends on; equal inputs give byte-identical folders."""
    inputs = {
        "format": FORMAT,
        "name": name,
        "checkpoints": {v: _sha256(p) for v, p in checkpoints.items()},
        "vocab": _sha256(vocab_path) if vocab_path else None,
        "settings": hashlib.sha256(json.dumps(
            {"evals": evals, "loss_history": [list(x) for x in loss_history or []], "meta": extra_meta},
            sort_keys=True, default=str).encode()).hexdigest(),
    }
    if figures:
        inputs["figures"] = {path.name: [_sha256(path), caption] for path, caption in figures}
    return inputs


def _figures(figures: Sequence[tuple[str | os.PathLike, str]]) -> list[tuple[Path, str]]:
    """The card's extra figures as (file, caption), checked to exist."""
    checked = [(Path(path), str(caption)) for path, caption in figures]
    for path, _ in checked:
        if not path.is_file():
            raise ReleaseError(f"{path}: figure for the model card not found")
    return checked


def _sources(checkpoint, finetune, vocab_path) -> tuple[dict[str, Path], Path]:
    """The variants' checkpoint files and the vocabulary, checked to exist. Default vocabulary: the shipped one."""
    checkpoints = {"base": Path(checkpoint)} | ({"finetune": Path(finetune)} if finetune else {})
    for path in checkpoints.values():
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
    if vocab_path is None:
        from data_prep.tokenizer import DEFAULT_VOCAB_PATH

        vocab_path = DEFAULT_VOCAB_PATH
    if not Path(vocab_path).is_file():
        raise ReleaseError(f"{vocab_path}: tokenizer vocabulary not found")
    return checkpoints, Path(vocab_path)


def build_release(
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    name: str,
    finetune: str | os.PathLike | None = None,
    evals: Mapping | None = None,
    loss_history: Sequence[tuple[float, float]] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    vocab_path: str | os.PathLike | None = None,
    figures: Sequence[tuple[str | os.PathLike, str]] = (),
) -> Path:
    """Write a complete release folder at `out_dir` (staged next to it, then renamed into place).

    Args:
        out_dir: the folder to create; an existing one is replaced.
        checkpoint: the base model's native checkpoint (`rwkv5.checkpoint`).
        name: release name (model card title, Hub commit messages).
        finetune: the fine-tuned model's native checkpoint; must have the base's shape. Default: none.
        evals: {metric: value} for the base, or {variant: {metric: value}}.
        loss_history: (tokens or step, loss) pairs for the loss curve. Default: no curve.
        extra_meta: facts merged into every variant's metadata (run, step, tokens_seen, hyperparameters...).
        vocab_path: tokenizer vocabulary. Default: the shipped RWKV World vocabulary.
        figures: (PNG file, caption) pairs copied into the release and shown in the card (the long-context
            stage's loss against position). Default: none.

    Returns:
        The folder.
    """
    checkpoints, vocab = _sources(checkpoint, finetune, vocab_path)
    evals, figures = _nested_evals(evals), _figures(figures)
    inputs = _inputs(checkpoints, name, evals, loss_history, extra_meta or {}, vocab, figures)
    return _build(Path(out_dir), checkpoints, vocab, name, evals, loss_history, extra_meta or {}, inputs, figures)


def _build(out: Path, checkpoints: Mapping[str, Path], vocab: Path, name: str, evals: dict,
           loss_history: Sequence | None, extra_meta: Mapping, inputs: dict,
           figures: Sequence[tuple[Path, str]] = ()) -> Path:
    """`build_release` once its inputs are checked and fingerprinted (hashing a 7B checkpoint takes a while)."""
    stage = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        variants, config = {}, None
        for variant, path in checkpoints.items():
            state_dict, cfg, meta = read_checkpoint(path)
            if config is not None and cfg != config:
                raise CheckpointError(f"{path}: the fine-tune's config differs from the base's ({cfg} vs {config})")
            config = cfg
            variants[variant] = {**meta, **extra_meta}
            if variant == "finetune" and "step" in meta:  # its own steps; extra_meta's step is pretraining's
                variants[variant].setdefault("finetune_steps", meta["step"])
            export_rwkv_pth(state_dict, stage / variant / "model.pth", torch.bfloat16)
            export_safetensors(state_dict, cfg, stage / variant, torch.bfloat16, vocab)
            del state_dict
        shutil.copyfile(vocab, stage / vocab.name)
        curve = None
        if loss_history:
            xlabel = "tokens seen" if max(x for x, _ in loss_history) > 1e5 else "step"
            (stage / LOSS_CURVE).write_bytes(loss_curve_png(loss_history, f"{name}: training loss", xlabel=xlabel))
            curve = LOSS_CURVE
        for path, _ in figures:
            shutil.copyfile(path, stage / path.name)
        listed = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        (stage / "README.md").write_text(model_card(name, config, variants, ["README.md", *listed, MANIFEST],
                                                    evals, curve, [(p.name, c) for p, c in figures]))
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "name": name,
            "inputs": inputs,
            "model_config": config.model_dump(),
            "parameters": count_parameters(config),
            "variants": {v: {"metadata": m, "evals": evals.get(v, {})} for v, m in variants.items()},
            "files": [{"path": p.relative_to(stage).as_posix(), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in files],
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


@dataclass
class VerifyReport:
    """Outcome of checking a release on a target against its manifest. Truthy when it verifies.

    Args:
        url: the target.
        problems: one line per bad file: `path: missing`, `path: size ...`, `path: sha256 ...`.
        manifest: the remote manifest, or None when it is absent or unreadable.
    """

    url: str
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None

    def __bool__(self) -> bool:
        return self.manifest is not None and not self.problems

    @property
    def bad_paths(self) -> list[str]:
        return [p.split(": ", 1)[0] for p in self.problems]


@dataclass
class PublishReport:
    """What a release run did: the target, the files it uploaded (manifest last), the registry version."""

    url: str
    uploaded: list[str]
    model_version: Any = None


def read_manifest(target: ReleaseTarget, listing: Mapping[str, RemoteFile] | None = None) -> dict | None:
    """The target's manifest, or None when it has none (or one that is not a release manifest)."""
    listing = target.list_files() if listing is None else listing
    if MANIFEST not in listing:
        return None
    try:
        with target.open(MANIFEST) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def _check_files(target: ReleaseTarget, entries: Sequence[Mapping], listing: Mapping[str, RemoteFile],
                 deep: bool) -> list[str]:
    """Problems of the listed files on the target. Not deep: trust a content hash the store reports."""
    problems = []
    for entry in entries:
        path, remote = entry["path"], listing.get(entry["path"])
        if remote is None:
            problems.append(f"{path}: missing")
            continue
        if remote.size != entry["bytes"]:
            problems.append(f"{path}: size {remote.size} bytes, manifest says {entry['bytes']}")
            continue
        if remote.sha256 is not None and not deep:
            got = remote.sha256
        else:
            try:
                with target.open(path) as f:
                    got = _sha256_stream(f)
            except Exception as exc:  # each store has its own read errors; all mean "cannot vouch for it"
                problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
                continue
        if got != entry["sha256"]:
            problems.append(f"{path}: sha256 {got}, manifest says {entry['sha256']}")
    return problems


def _target(where: str | os.PathLike | ReleaseTarget, options: Mapping[str, Any]) -> ReleaseTarget:
    return where if isinstance(where, ReleaseTarget) else open_target(where, **options)


def verify_release(where: str | os.PathLike | ReleaseTarget, *, deep: bool = True, **target_options) -> VerifyReport:
    """Check every file a target's manifest lists: present, same size, same sha256.

    Args:
        where: a target, or a URL / local folder (see `rwkv5.release.targets.open_target`).
        deep: hash every file's content (downloads it); False trusts hashes the store reports (the Hub's).
        **target_options: passed to `open_target`.
    """
    target = _target(where, target_options)
    listing = target.list_files()
    manifest = read_manifest(target, listing)
    if manifest is None:
        return VerifyReport(target.url, [f"{MANIFEST}: missing or unreadable"], None)
    return VerifyReport(target.url, _check_files(target, manifest["files"], listing, deep), manifest)


def publish_release(folder: str | os.PathLike, target: ReleaseTarget, *, replace: bool = False) -> list[str]:
    """Upload a built release folder: missing or differing files first, then the manifest. Returns what went up.

    Raises:
        ReleaseError: the target holds a different release (other manifest) and `replace` is False.
    """
    folder = Path(folder)
    local_bytes = (folder / MANIFEST).read_bytes()
    local = json.loads(local_bytes)
    target.prepare()
    listing = target.list_files()
    remote = read_manifest(target, listing)
    if remote is not None and remote != local and not replace:
        raise ReleaseError(f"{target.url}: holds another release ({remote.get('name')!r}, inputs "
                           f"{remote.get('inputs')}); refusing to overwrite it (use a new URL or replace=True)")
    todo = [p.split(": ", 1)[0] for p in _check_files(target, local["files"], listing, deep=False)]
    if todo:
        target.upload(folder, todo, f"{local['name']}: {len(todo)} file(s)")
    manifest_ok = MANIFEST in listing and listing[MANIFEST].size == len(local_bytes) and remote == local
    if not manifest_ok or todo:
        # Last, and again after a repair: the manifest is the commit point of the release.
        target.upload(folder, [MANIFEST], f"{local['name']}: manifest")
        todo.append(MANIFEST)
    return todo


def release(
    checkpoint: str | os.PathLike,
    to: str | os.PathLike | ReleaseTarget,
    *,
    name: str,
    finetune: str | os.PathLike | None = None,
    evals: Mapping | None = None,
    loss_history: Sequence[tuple[float, float]] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    vocab_path: str | os.PathLike | None = None,
    replace: bool = False,
    work_dir: str | os.PathLike | None = None,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    figures: Sequence[tuple[str | os.PathLike, str]] = (),
    **target_options,
) -> PublishReport:
    """Build (when needed), upload and optionally register one milestone release. Idempotent.

    Args:
        checkpoint, name, finetune, evals, loss_history, extra_meta, vocab_path, figures: see `build_release`.
        to: a target or its URL (local folder, fsspec URL, `hf://org/name@revision`).
        replace: overwrite a different release at the same place. Default: refuse.
        work_dir: where the folder is built before upload. Default: the system temp folder.
        register_as: MLflow registered-model name; the release URL becomes a model version. Default: no registry.
        tracking_uri, run_id: MLflow server and the run the version links to. Default: MLflow's environment.
        **target_options: passed to `open_target` (storage_options, endpoint, token, private).

    Returns:
        PublishReport: target URL, the files uploaded (empty when the release was already complete).
    """
    target = _target(to, target_options)
    if register_as:
        check_registrable(target.url, register_as)  # before uploading anything
    evals, figures = _nested_evals(evals), _figures(figures)
    checkpoints, vocab = _sources(checkpoint, finetune, vocab_path)
    inputs = _inputs(checkpoints, name, evals, loss_history, extra_meta or {}, vocab, figures)
    listing = target.list_files()
    remote = read_manifest(target, listing)
    uploaded: list[str] = []
    if remote is None or remote.get("inputs") != inputs or _check_files(target, remote["files"], listing, False):
        with tempfile.TemporaryDirectory(prefix="rwkv5-release-", dir=work_dir) as tmp:
            folder = _build(Path(tmp) / "release", checkpoints, vocab, name, evals, loss_history,
                            extra_meta or {}, inputs, figures)
            uploaded = publish_release(folder, target, replace=replace)
    report = PublishReport(target.url, uploaded)
    if register_as:
        report.model_version = register_release(target.url, register_as, tracking_uri=tracking_uri, run_id=run_id,
                                                tags={"release_name": name, "inputs": inputs["settings"]})
    return report


def release_local(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, name: str, evals: Mapping | None = None,
    vocab_path: str | os.PathLike | None = None, extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Release one checkpoint to a local folder; returns the folder. Idempotent (see `release`)."""
    release(checkpoint, LocalTarget(out_dir), name=name, evals=evals, vocab_path=vocab_path, extra_meta=extra_meta,
            replace=True)
    return Path(out_dir)
