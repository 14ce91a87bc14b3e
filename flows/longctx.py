"""The `longctx` flow: the long-context stage on a milestone checkpoint (the model people use is its release).

Started by the `rwkv5.milestone.released` event the milestone flow emits once a run's last milestone is
released (deployment `longctx/auto`, settings from the event), or by hand on any milestone checkpoint
(`prefect deployment run longctx/tiny -p checkpoint=...`). Stages: pack long samples from the run's own
training shards, score the held-out ones per position, fine-tune on the rest with the segmented full-BPTT
fine-tune, score again, plot, log to MLflow and release with its own card and manifest. Each stage reuses
what is done (packed samples, a finished fine-tune, a complete release), so a retried run repeats no work.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.paths import Layout
from rwkv5.train.long_context_settings import LongContextSettings, long_context_settings_from

__all__ = ["longctx"]


@task(name="pack-long-samples", retries=1)
def pack_stage(data_dir: str, out_dir: str, settings: LongContextSettings) -> dict:
    """Training and held-out samples of `sample_len` positions from the longest documents of the shards."""
    from data_prep.long_samples import pack_long_samples

    packed = pack_long_samples(data_dir, out_dir, settings.sample_len, settings.train_samples,
                               settings.heldout_samples, scan_tokens=settings.scan_tokens)
    documents = packed.meta["documents"]
    return {"train": str(packed.train), "heldout": str(packed.heldout),
            "train_documents": documents["train"], "heldout_documents": documents["heldout"]}


@task(name="evaluate-positions", retries=1)
def evaluate_stage(checkpoint: str, heldout: str, settings: LongContextSettings) -> dict:
    """Loss at each of `eval_positions` on the held-out samples, in RNN mode (state carried over segments)."""
    from rwkv5.eval.long_context import evaluate_long_context

    return evaluate_long_context(checkpoint, heldout, settings.eval_positions, settings.segment_len)


@task(name="fine-tune-long", retries=1)
def finetune_stage(base: str, samples: str, storage: str, run_name: str, settings: LongContextSettings) -> dict:
    """`steps` optimizer steps on the packed samples through the pretraining loop (DeepSpeed ZeRO-2)."""
    from rwkv5.train.long_context import finetune_long_context

    return finetune_long_context(base, samples, storage, run_name, settings.steps, settings.samples_per_step,
                                 settings.lr, settings.segment_len, settings.workers, settings.gpus_per_worker)


@task(name="plot-positions")
def plot_stage(path: str, evals: dict, title: str) -> str:
    from rwkv5.eval.long_context import save_position_loss_plot

    return save_position_loss_plot(path, {name: report["long_context"]["positions"]
                                           for name, report in evals.items()}, title)


@task(name="log-evals", retries=1)
def log_evals_stage(run: str, tag: str, evals: dict, figure: str) -> None:
    """Before and after into the stage's own MLflow run (experiment rwkv5-milestones), the plot beside them."""
    from rwkv5.tracking import log_milestone_evals

    log_milestone_evals(run, tag, evals, figures=[figure])


@task(name="release", retries=2, retry_delay_seconds=10)
def release_stage(checkpoint: str, to: str, name: str, evals: dict, meta: dict, history: list, figure: str,
                  register_as: str | None) -> str:
    """The long-context model with its own card (per-position losses, plot) and manifest; idempotent."""
    from rwkv5.release import release

    return release(checkpoint, to, name=name, evals=evals, loss_history=history, extra_meta=meta,
                   figures=[(figure, "Loss against position")], register_as=register_as).url


@flow(name="longctx", log_prints=True)
def longctx(
    checkpoint: str,
    settings: LongContextSettings | None = None,
    run: str | None = None,
    state_dir: str | None = None,
) -> dict:
    """Fine-tune `checkpoint` on long samples, evaluate it per position before and after, release it.

    Args:
        checkpoint: a milestone checkpoint (`.../milestones/mNNN/model.safetensors`, or its file:// URI).
        settings: what the stage does (`rwkv5.train.long_context_settings.LongContextSettings`: sample length,
            steps, lr, segment length, positions, workers and GPUs, the pretraining source). Default: its
            defaults, the real stage (131,072 positions).
        run: the pretraining run. Default: the one the checkpoint's metadata names.
        state_dir: the state directory. Default: $RWKV5_HOME or ./.state.

    Returns:
        `{"release": url, "before": {position: loss}, "after": {position: loss}}`.
    """
    from rwkv5.checkpoint import read_checkpoint_config
    from rwkv5.errors import ConfigError
    from rwkv5.eval.evaluate import flat_metrics
    from rwkv5.release.milestones import data_description, release_tag, release_target
    from rwkv5.tracking import registry_name
    from rwkv5.train.trace import loss_history, read_trace

    settings = long_context_settings_from(settings)
    path = checkpoint.removeprefix("file://")
    _, facts = read_checkpoint_config(path)
    run = run or facts.get("run_name")
    if not run:
        raise ConfigError(f"{path}: the checkpoint's metadata names no run; pass run=<the pretraining run>")
    percent = facts.get("percent")
    tag = "longctx" if percent is None else f"longctx-{release_tag(percent)}"
    layout = Layout.default(state_dir)
    work, train_dir = layout.long_context(run) / tag, layout.tokens_dir(settings.data_source) / "train"
    samples = pack_stage(str(train_dir), str(work / "samples"), settings)
    before = evaluate_stage(path, samples["heldout"], settings)
    name = f"{run}-{tag}"
    ft = finetune_stage(path, samples["train"], str(layout.finetunes), name, settings)
    after = evaluate_stage(ft["checkpoint"], samples["heldout"], settings)
    evals = {"before": before, "after": after}
    figure = plot_stage(str(work / "position_loss.png"), evals, f"{name}: held-out loss by position")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        log_evals_stage(run, tag, evals, figure)
    card = flat_metrics(after) | {f"{metric}_before": value for metric, value in flat_metrics(before).items()}
    origin = path if percent is None else f"{release_tag(percent)} ({percent}% of the token budget)"
    meta = {"run": run, "stage": f"long-context fine-tune of {origin}", "step": facts.get("step"),
            "tokens_seen": facts.get("tokens_seen"), "long_context_sample_len": settings.sample_len,
            "long_context_steps": ft["steps"], "long_context_samples_per_step": settings.samples_per_step,
            "data": f"{data_description(settings.data_source, train_dir)}; long samples: the longest documents of "
                    f"its train split ({samples['train_documents']} to train, {samples['heldout_documents']} held out)"}
    target = release_target(settings.release_to, layout.releases(run), percent or 0, tag=tag)
    history = loss_history(read_trace(layout.finetunes / name / "trace.jsonl"))
    url = release_stage(ft["checkpoint"], target, name, card, meta, history, figure,
                        registry_name(run, target))
    get_run_logger().info("long-context stage of %s: released %s", run, url)
    return {"release": url, "before": before["long_context"]["positions"],
            "after": after["long_context"]["positions"]}
