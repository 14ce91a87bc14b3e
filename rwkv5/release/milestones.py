"""The milestone table of a run: one row per released milestone, and which milestones still need a release.

A milestone is named by its percent of the token budget (`release_tag`: "m010" for 10%), in release folders,
Hub branches, fine-tune runs and MLflow runs. That is not the milestone index that names the pretraining
run's checkpoint folders (`rwkv5.train.milestones.milestone_dir`: "m001" for the first milestone).

Milestone runs normally start in percent order, but one may not (the Prefect server processes events two at
a time, so two milestones reached within moments may create their runs in either order), and on a small
machine they fall behind pretraining. So the run that holds the milestone slot releases every complete
milestone without a row, earlier ones before its own and later ones after it (`release_order`): releases
follow percent order whatever order the runs start in, and a run that starts late finds its row written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from data_prep.atomic import atomic_write_text

__all__ = ["release_tag", "release_target", "MilestoneTable", "release_order", "milestone_row", "data_description"]


def data_description(source: str, train_dir: str | Path | None = None) -> str:
    """The model card's "data" line: what the pretraining run actually read.

    Args:
        source: the pretrain flow's source: "sample" (the offline sample), a Hub repo id, or a folder/URL.
        train_dir: the tokenized train split; when it has a manifest, its token and document counts are added.
    """
    if source == "sample":
        text = ("the offline SlimPajama-format sample built from the Python standard library (data_prep.sample), "
                "not SlimPajama-627B")
    elif "://" in source or Path(source).is_absolute():
        text = f"SlimPajama-layout files from {source}"
    else:
        text = f"{source} from the Hugging Face Hub"
    if train_dir is not None and (Path(train_dir) / "manifest.json").is_file():
        from data_prep.shards import read_manifest

        manifest = read_manifest(train_dir)
        text += (f"; train split: {manifest.tokens:,} tokens in {manifest.documents:,} documents from "
                 f"{len(manifest.by_source)} sets")
    return text


def release_tag(percent: int) -> str:
    """The name of the milestone at `percent` of the token budget in releases and MLflow."""
    return f"m{percent:03d}"


def release_target(release_to: str | None, default_root: Path, percent: int, tag: str | None = None) -> str:
    """Where the milestone's release goes: a sub-folder of `release_to` (a folder or fsspec URL), a branch of
    a Hub repo (`hf://org/name`), or by default a sub-folder of `default_root`; named `tag` when given (the
    long-context release), else by the milestone's `release_tag`."""
    tag = tag or release_tag(percent)
    if not release_to:
        return str(default_root / tag)
    if release_to.startswith("hf://"):
        return f"{release_to}@{tag}"  # one branch per milestone of one Hub repo
    return f"{release_to.rstrip('/')}/{tag}"


class MilestoneTable:
    """The released milestones of one run: a JSON file per milestone in `folder`, written once it is released.

    Args:
        folder (Path): the run's milestone-results folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, percent: int) -> Path:
        return self.folder / f"{release_tag(percent)}.json"

    def get(self, percent: int) -> dict | None:
        """The row of the milestone at `percent`, or None while it has no release."""
        path = self._path(percent)
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, row: Mapping) -> None:
        """Record a released milestone (atomically: a reader never sees half a row)."""
        atomic_write_text(self._path(row["percent"]), json.dumps(dict(row)))

    def rows(self) -> list[dict]:
        """Every released milestone's row, in percent order."""
        rows = [json.loads(path.read_text()) for path in self.folder.glob("m*.json")]
        return sorted(rows, key=lambda row: row["percent"])

    def unreleased(self, completed: list[dict]) -> list[dict]:
        """The complete milestones (`rwkv5.train.milestones.completed`) that have no row yet, in order."""
        return [info for info in completed if self.get(info["percent"]) is None]


def release_order(pending: list[dict], own: dict) -> list[dict]:
    """What the run of milestone `own` releases, in order: pending milestones before its own, its own, then
    pending ones after it. `own` comes from the milestone event; `pending` from `MilestoneTable.unreleased`."""
    earlier = [info for info in pending if info["percent"] < own["percent"]]
    later = [info for info in pending if info["percent"] > own["percent"]]
    return [*earlier, own, *later]


def milestone_row(info: Mapping, finetune: Mapping, evals: Mapping[str, Mapping], release_url: str) -> dict:
    """One row of the milestone table: where pretraining was, the fine-tune's steps, the eval scores of base
    and fine-tune and the release's location.

    The fine-tune's effect is `chat_loss_before` and `chat_loss_after`: the held-out chat loss of base and
    fine-tune (the eval reports' "chat", when the milestone evaluated a chat file), one fixed set of samples
    the fine-tune never trained on. The first and last batch losses of the fine-tune are of different samples
    and say nothing about progress, so the row does not carry them. LAMBADA is there where it was evaluated.
    """
    row = {"percent": info["percent"], "step": info["step"], "tokens_seen": info["tokens_seen"],
           "val_loss_base": round(evals["base"]["validation"]["loss"], 4),
           "val_loss_finetune": round(evals["finetune"]["validation"]["loss"], 4),
           "finetune_steps": finetune["steps"]}
    if "chat" in evals["base"] and "chat" in evals["finetune"]:
        row["chat_loss_before"] = round(evals["base"]["chat"]["loss"], 4)
        row["chat_loss_after"] = round(evals["finetune"]["chat"]["loss"], 4)
    if "lambada" in evals["base"]:
        for variant in ("base", "finetune"):
            row[f"lambada_acc_{variant}"] = round(evals[variant]["lambada"]["accuracy"], 4)
            row[f"lambada_ppl_{variant}"] = round(evals[variant]["lambada"]["ppl"], 2)
    row["release"] = release_url
    return row
