"""What a milestone run does, and where it runs: the settings every milestone of a run shares, and the
choice between pausing pretraining for each milestone (`shared`) and running milestones beside it (`dedicated`).

The settings are one typed object: the pretrain flow takes it as one parameter, sends it in the milestone event
as one payload field, and the milestone flow receives it as one parameter, validated here once. A new setting
is one new field.

Where milestones run is decided per run, before anything starts (`rwkv5.train.preflight`):
- `dedicated`: milestone runs start from the pretraining event and run beside pretraining, on resources of
  their own (a cluster with GPUs to spare);
- `shared`: pretraining stops at each milestone with its checkpoint (its Ray Train run ends and frees the GPUs),
  the milestone run uses those GPUs, and pretraining resumes from the checkpoint (one 8-GPU node);
- `auto`: `dedicated` where the cluster holds pretraining and one fine-tune at once, else `shared`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from rwkv5.errors import ConfigError
from rwkv5.train.config import validate_section
from rwkv5.train.long_context_settings import LongContextSettings

__all__ = ["MILESTONE_MODES", "MilestoneSettings", "Placement", "place_milestones", "settings_from"]

MILESTONE_MODES = ("auto", "shared", "dedicated")


class MilestoneSettings(BaseModel):
    """The milestone flow's knobs, the same for every milestone of a run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    finetune_workers: int = 1
    """Ray Train workers of each fine-tune; 0 fine-tunes in the milestone flow's own process (the CPU demo: no
    worker start-up per milestone)."""
    gpus_per_worker: float | None = None
    """GPUs of each fine-tune worker (a fraction shares a GPU). None: the pretraining workers' share."""
    finetune_steps: int = 10
    """Optimizer steps of each chat fine-tune."""
    finetune_lr: float = 1e-4
    """Peak learning rate of the fine-tune (cosine to a tenth of it)."""
    finetune_max_len: int = 1024
    """Longest chat sample kept, in tokens (longer ones are cut; each is processed in state-passing segments)."""
    chat_data: str | None = None
    """Chat JSONL for the fine-tune: a path, an fsspec URL or a Hub dataset file (`hf://datasets/<repo>/<file>`).
    None: a small chat set built from local docstrings."""
    chat_heldout: int = 32
    """Chat samples held out of the fine-tune and scored before and after it (the table's chat loss)."""
    lambada: str | None = None
    """LAMBADA JSONL each milestone is scored on: "shipped" (the package's copy), a path or an fsspec URL.
    None: no LAMBADA score."""
    eval_ctx_len: int = 128
    """Validation window length."""
    eval_limit: int = 64
    """Validation windows and LAMBADA passages each evaluation scores (the first ones)."""
    release_to: str | None = None
    """Where releases go: a folder or fsspec URL (one sub-folder per milestone) or a Hub repo `hf://org/name`
    (one branch per milestone). None: the state directory's releases/<run>/."""
    data_source: str = "sample"
    """The pretraining source ("sample", a Hub repo id, a folder); the pretrain flow fills it in. Its tokenized
    validation split is evaluated, and the model card names it as the data."""
    long_context: LongContextSettings | None = None
    """The long-context stage that follows the last milestone's release (the `longctx` flow, started by the
    event the milestone flow then emits). None: no long-context stage."""

    @model_validator(mode="after")
    def _check(self) -> "MilestoneSettings":
        for name in ("finetune_workers", "eval_limit", "chat_heldout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"milestones.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("finetune_steps", "finetune_max_len", "eval_ctx_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"milestones.{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_lr <= 0:
            raise ConfigError(f"milestones.finetune_lr must be > 0, got {self.finetune_lr}")
        gpus = self.gpus_per_worker
        if gpus is not None and (gpus < 0 or (gpus > 1 and not float(gpus).is_integer())):
            raise ConfigError(f"milestones.gpus_per_worker must be 0, a fraction of one GPU or a whole number, "
                              f"got {gpus}")
        return self

    def finetune_gpus(self, pretrain_gpus_per_worker: float) -> float:
        """GPUs each fine-tune worker asks for (the pretraining share unless set)."""
        return pretrain_gpus_per_worker if self.gpus_per_worker is None else self.gpus_per_worker

    def for_run(self, data_source: str, pretrain_gpus_per_worker: float) -> "MilestoneSettings":
        """A copy with what the pretraining run decides filled in: the source and the fine-tune's GPUs."""
        return self.model_copy(update={"data_source": data_source,
                                       "gpus_per_worker": self.finetune_gpus(pretrain_gpus_per_worker)})


def settings_from(value: "MilestoneSettings | dict | None") -> MilestoneSettings:
    """Settings from a flow parameter or an event payload (a dict), with errors that name the field."""
    return validate_section(MilestoneSettings, value, "milestones")


class Placement(BaseModel):
    """Where the milestones of a run go, and the numbers behind the choice (one line for the preflight table)."""

    model_config = ConfigDict(frozen=True)

    requested: str
    mode: Literal["shared", "dedicated"] | None
    """None: the run cannot go ahead as asked (see `detail`)."""
    detail: str

    @property
    def ok(self) -> bool:
        return self.mode is not None


def _need(workers: int, gpus_per_worker: float) -> str:
    if workers == 0:
        return f"{gpus_per_worker:g} GPUs (the milestone flow's process)"
    return f"{workers * gpus_per_worker:g} GPUs ({workers} x {gpus_per_worker:g})"


def place_milestones(requested: str, workers: int, gpus_per_worker: float, finetune_workers: int,
                     finetune_gpus_per_worker: float, cluster_gpus: float | None,
                     cluster_cpus: float | None) -> Placement:
    """Resolve `requested` ("auto", "shared" or "dedicated") for a run on a cluster of the given size.

    Pretraining asks for `workers` x `gpus_per_worker` GPUs and a CPU per worker, a fine-tune for
    `finetune_workers` x `finetune_gpus_per_worker` and a CPU per worker. With 0 workers the fine-tune runs in
    the milestone flow's own process: no Ray resources, but on a GPU it still takes `finetune_gpus_per_worker`
    of the node's GPUs, which Ray does not see, so they count here. `cluster_gpus`/`cluster_cpus` are what the
    cluster has or its autoscaler may grow to; None where no Ray cluster is involved.
    """
    if requested not in MILESTONE_MODES:
        raise ConfigError(f"milestone_mode must be one of {', '.join(MILESTONE_MODES)}, got {requested!r}")
    train_gpus, tune_gpus = workers * gpus_per_worker, max(finetune_workers, 1) * finetune_gpus_per_worker
    train_cpus, tune_cpus = workers, finetune_workers
    if cluster_gpus is None:  # neither side uses Ray: each runs in a process of its own
        mode = "dedicated" if requested == "auto" else requested
        return Placement(requested=requested, mode=mode,
                         detail=f"{requested} -> {mode}: pretraining and milestone runs train in their own "
                                f"processes, without Ray")
    have = (f"the cluster has {cluster_gpus:g} GPUs and {cluster_cpus:g} CPUs; pretraining takes "
            f"{_need(workers, gpus_per_worker)}, a fine-tune {_need(finetune_workers, finetune_gpus_per_worker)}")
    if tune_gpus > cluster_gpus or tune_cpus > cluster_cpus:
        return Placement(requested=requested, mode=None,
                         detail=f"{requested}: a milestone fine-tune never fits: {have}")
    both = train_gpus + tune_gpus <= cluster_gpus and train_cpus + tune_cpus <= cluster_cpus
    together = f"both at once need {train_gpus + tune_gpus:g} GPUs and {train_cpus + tune_cpus} CPUs"
    if requested == "dedicated" and not both:
        return Placement(requested=requested, mode=None,
                         detail=f"dedicated does not fit: {have}; {together} (use milestone_mode shared or auto)")
    mode = requested if requested != "auto" else ("dedicated" if both else "shared")
    return Placement(requested=requested, mode=mode, detail=f"{requested} -> {mode}: {have}; {together}")
