"""The `milestone` flow: fine-tune, evaluate and release one pretraining milestone.

Started by the `rwkv5.pretrain.milestone` event (see prefect.yaml) in milestone mode `dedicated`, or by the
pretrain flow while pretraining is paused (`shared`, `flows.milestone_runs`). Runs go one at a time, in the order the
events created them: the deployment's concurrency limit of 1 (ENQUEUE) guards the slot, and the work queue
`milestones`, limited to 1 by `rwkv5 up`, makes the worker take the earliest waiting run (the deployment limit
alone hands refused runs a later start time each, which reorders them). The run holding the slot also
releases every earlier or later milestone that is complete and has no release yet
(`rwkv5.release.milestones.release_order`), so releases follow percent order. Each stage skips work that is
already done, so a retried or re-sent milestone never releases twice.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.paths import Layout, artifact_key
from rwkv5.train.milestone_settings import MilestoneSettings, settings_from

__all__ = ["milestone"]


@task(name="chat-data", retries=2, retry_delay_seconds=10)
def chat_data_stage(uri: str, cache_dir: str) -> str:
    """A local copy of the chat data (a path as given; a URL or Hub file fetched once, verified, into the state
    folder), which every fine-tune worker and the evaluation read."""
    from rwkv5.train.chat import resolve_chat_data

    return str(resolve_chat_data(uri, cache_dir))


@task(name="fine-tune", retries=1)
def finetune_stage(base: str, storage: str, run_name: str, chat_data: str | None, settings: MilestoneSettings) -> dict:
    """Chat SFT of the milestone through the pretraining loop (DeepSpeed ZeRO-2, bf16, segmented loss), the
    held-out chat samples left out."""
    from rwkv5.train.finetune import finetune_milestone

    return finetune_milestone(base, storage, run_name, chat_data, settings.finetune_steps, settings.finetune_lr,
                              settings.finetune_max_len, settings.finetune_workers, settings.gpus_per_worker or 0,
                              heldout=settings.chat_heldout)


@task(name="evaluate", retries=1)
def evaluate_stage(checkpoint: str, validation_dir: str, lambada: str | None, chat_data: str,
                   settings: MilestoneSettings) -> dict:
    """Validation loss per source, the held-out chat loss and, given a LAMBADA file, LAMBADA accuracy and
    perplexity (RNN mode)."""
    from rwkv5.eval.evaluate import evaluate_saved

    return evaluate_saved(checkpoint, validation_dir, lambada, settings.eval_ctx_len, settings.eval_limit,
                          chat_data=chat_data, chat_heldout=settings.chat_heldout,
                          chat_max_len=settings.finetune_max_len)


@task(name="log-evals", retries=1)
def log_evals_stage(run: str, percent: int, evals: dict) -> None:
    """Eval metrics into the milestone's own MLflow run (experiment rwkv5-milestones)."""
    from rwkv5.release.milestones import release_tag
    from rwkv5.tracking import log_milestone_evals

    log_milestone_evals(run, release_tag(percent), evals)


@task(name="release", retries=2, retry_delay_seconds=10)
def release_stage(base: str, finetune: str, to: str, name: str, evals: dict, meta: dict,
                  loss_history: list[tuple[float, float]], register_as: str | None) -> str:
    """Base and fine-tune in one release (idempotent: a complete release is verified, not uploaded again)."""
    from rwkv5.release import release

    report = release(base, to, name=name, finetune=finetune, evals=evals, loss_history=loss_history,
                     extra_meta=meta, register_as=register_as)
    get_run_logger().info("release %s: %d files uploaded", report.url, len(report.uploaded))
    return report.url


@flow(name="milestone", log_prints=True)
def milestone(
    run: str,
    percent: int,
    step: int,
    tokens_seen: int,
    checkpoint_uri: str,
    settings: MilestoneSettings | None = None,
    state_dir: str | None = None,
) -> dict:
    """Fine-tune, evaluate and release the milestone at `percent` of run `run`'s token budget.

    Args:
        run: the pretraining run name.
        percent: the milestone, in percent of the token budget.
        step, tokens_seen: where pretraining was.
        checkpoint_uri: the consolidated bf16 milestone checkpoint.
        settings: what the run does (`rwkv5.train.milestone_settings.MilestoneSettings`: fine-tune workers,
            GPUs, steps and data, evaluation, release target, the pretraining source); the pretraining event
            (or, in shared mode, the pretrain flow) sends the run's. Default: its defaults.
        state_dir: the state directory. Default: $RWKV5_HOME or ./.state.
    """
    from rwkv5.release.milestones import MilestoneTable, release_order
    from rwkv5.train.milestones import completed, run_dir_of

    settings = settings_from(settings)
    if settings.finetune_workers == 0 and not settings.gpus_per_worker:
        # The CPU demo: this run's fine-tune and evaluations share the cores with the pretraining process; one
        # thread here leaves it the rest instead of oversubscribing them (bench/NOTES.md, "First run").
        import torch

        torch.set_num_threads(1)
    layout = Layout.default(state_dir)
    table = MilestoneTable(layout.milestone_results(run))
    own = {"percent": percent, "step": step, "tokens_seen": tokens_seen,
           "path": checkpoint_uri.removeprefix("file://")}
    for info in release_order(table.unreleased(completed(run_dir_of(own["path"]))), own):
        if table.get(info["percent"]) is None:  # another milestone's run may have released it meanwhile
            _release_milestone(layout, run, info, settings, table)
    return table.get(percent)


def _release_milestone(layout: Layout, run: str, info: dict, settings: MilestoneSettings, table) -> None:
    """Fine-tune, evaluate and release one milestone, then add its row to the milestone table."""
    from rwkv5.eval.evaluate import flat_metrics
    from rwkv5.eval.lambada import fetch_lambada
    from rwkv5.release.milestones import data_description, milestone_row, release_tag, release_target
    from rwkv5.tracking import registry_name
    from rwkv5.train.trace import loss_history, read_trace

    name = f"{run}-{release_tag(info['percent'])}"
    chat = chat_data_stage(settings.chat_data, str(layout.root / "chat-data")) if settings.chat_data else None
    ft = finetune_stage(info["path"], str(layout.finetunes), name, chat, settings)
    validation = str(layout.tokens_dir(settings.data_source) / "validation")
    lambada = str(fetch_lambada(settings.lambada, layout.root / "eval-data")) if settings.lambada else None
    # Both variants on the same held-out chat samples: the loss before and after the fine-tune.
    evals = {variant: evaluate_stage(checkpoint, validation, lambada, ft["chat_data"], settings)
             for variant, checkpoint in (("base", info["path"]), ("finetune", ft["checkpoint"]))}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        log_evals_stage(run, info["percent"], evals)
    card_evals = {variant: flat_metrics(report) for variant, report in evals.items()}
    target = release_target(settings.release_to, layout.releases(run), info["percent"])
    meta = {"run": run, "percent": info["percent"], "step": info["step"], "tokens_seen": info["tokens_seen"],
            "data": data_description(settings.data_source, layout.tokens_dir(settings.data_source) / "train")}
    # The curve up to this milestone only: the release's inputs must not change while training goes on.
    history = loss_history(read_trace(layout.checkpoints / run / "trace.jsonl"), before_step=info["step"])
    url = release_stage(info["path"], ft["checkpoint"], target, name, card_evals, meta, history,
                        registry_name(run, target))
    table.write(milestone_row(info, ft, evals, url))
    create_table_artifact(key=artifact_key("milestones", run), table=table.rows(),
                          description=f"{run}: milestones, losses, eval scores and releases")
    get_run_logger().info("milestone %s %d%%: released %s", run, info["percent"], url)
    if info["percent"] >= 100 and settings.long_context is not None:  # the last one: the long-context stage next
        from flows.events import emit_last_release

        emit_last_release(run, info, settings)
