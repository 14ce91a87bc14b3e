"""The `pretrain` flow: download -> tokenize -> pretrain. Each task is one call into the libraries.

Every stage is idempotent (verified files, finished shards and the latest checkpoint are kept), so a re-run
of the same deployment skips what is done and resumes training. Where milestones run is decided in preflight
(`milestone_mode`): `dedicated` milestones are started by Prefect events from the training workers and run
beside pretraining; `shared` ones are started here after pretraining has stopped at the milestone, and
pretraining resumes once the milestone run has completed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

from flows.artifacts import publish_loss_curve, run_dashboard
from flows.events import (
    PrefectMilestoneEvents,
    PrefectProgress,
    budget_percent,
    emit_progress_line,
    milestone_parameters,
)
from flows.milestone_runs import run_milestone
from flows.paths import Layout, artifact_key
from rwkv5.train.config import run_preset, with_overrides
from rwkv5.train.milestone_settings import MilestoneSettings, settings_from

__all__ = ["pretrain", "SAMPLE_SOURCE", "HUB_SOURCE"]

SAMPLE_SOURCE = "sample"
"""Build the offline SlimPajama-format sample and use it as the source (the embedded demo)."""
HUB_SOURCE = "cerebras/SlimPajama-627B"


@task(name="preflight")
def preflight_stage(run_name: str, needs: dict) -> str:
    """Cluster GPUs, where milestones run, shared paths, disk, Hub access, CUDA kernel: one line per failure,
    before any download. Returns the milestone mode the run uses ("shared" or "dedicated")."""
    from rwkv5.train.preflight import RunNeeds, run_preflight

    report = run_preflight(RunNeeds(**needs))
    create_table_artifact(key=artifact_key("preflight", run_name), table=report.rows(),
                          description=f"{run_name}: preflight checks")
    report.raise_if_failed()
    return report.milestone_mode


@task(name="build-sample", retries=1)
def build_sample_stage(out_dir: str) -> str:
    from data_prep.sample import build_sample

    build_sample(out_dir)
    return out_dir


@task(name="download", retries=2, retry_delay_seconds=30)
def download_stage(source: str, out_dir: str, splits: list[str], fraction: float, revision: str) -> dict:
    from data_prep.download import download
    from data_prep.source import Selection, open_source

    summary = download(open_source(source, revision=revision), out_dir,
                       Selection(splits=tuple(splits), fraction=fraction), progress=False)
    create_markdown_artifact(key=artifact_key("download", Path(out_dir).parent.name), markdown=summary.markdown(),
                             description="Files selected, downloaded and verified")
    get_run_logger().info("download: %d downloaded, %d already verified", summary.downloaded, summary.skipped)
    return summary.to_dict()


@task(name="tokenize", retries=1)
def tokenize_stage(src_dir: str, out_dir: str, workers: int) -> dict:
    from data_prep.tokenize import TokenizeConfig, tokenize

    summary = tokenize(src_dir, out_dir, TokenizeConfig(workers=workers, progress=False))
    create_markdown_artifact(key=artifact_key("tokenize", Path(out_dir).parent.name), markdown=summary.to_markdown(),
                             description="Documents, tokens per source, shards, throughput")
    get_run_logger().info("tokenize: %d tokens in %d shards", summary.tokens, summary.shards)
    return summary.to_json()


@task(name="pretrain", retries=2, retry_delay_seconds=10)
def pretrain_stage(run_name: str, preset: str, data_dir: str, storage: str, workers: int, gpus_per_worker: float,
                   token_budget: int | None, progress_id: str, settings: MilestoneSettings, shared: bool) -> dict:
    """Train (or resume) the run: to the end of the budget, or (`shared`) to the next milestone, where training
    stops so that the milestone run can use the GPUs. Milestone events (`dedicated`), the budget bar and the trace
    come from its callbacks."""
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.launch import run_training

    overrides = {"token_budget": token_budget} if token_budget else {}
    config = with_overrides(run_preset(preset), overrides | {"milestones.pause": shared})
    resume = bool(list_checkpoints(Path(storage) / run_name))  # a re-run of the same run continues it
    get_run_logger().info("pretrain %s (%s preset, %d steps), resume=%s, milestones %s", run_name, preset,
                          config.total_steps, resume, "shared" if shared else "dedicated")
    trace = Path(storage) / run_name / "trace.jsonl"
    callbacks = [PrefectProgress(artifact_id=progress_id, run_name=run_name), TraceCallback(trace)]
    if not shared:
        callbacks.insert(0, PrefectMilestoneEvents(run_name=run_name, settings=settings))
    metrics = run_training(config, run_name, data_dir, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                           resume=resume, callbacks=callbacks)
    if metrics.get("tokens_seen") is not None:  # also when a re-run found nothing left to train
        update_progress_artifact(artifact_id=progress_id,
                                 progress=budget_percent(metrics["tokens_seen"], config.token_budget))
    publish_loss_curve(run_name, trace)
    return {"run_name": run_name, "finished": metrics.get("step", 0) >= config.total_steps,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


@task(name="milestone-runs")
def milestone_runs_stage(run_name: str, storage: str, results_dir: str, settings: MilestoneSettings,
                         progress_id: str) -> list[int]:
    """Shared mode: a milestone flow run for each milestone pretraining has written and nothing has released
    yet, in percent order, each waited for; the budget bar says pretraining is paused meanwhile."""
    from rwkv5.release.milestones import MilestoneTable
    from rwkv5.train.milestones import completed

    table, done = MilestoneTable(results_dir), []
    for info in table.unreleased(completed(Path(storage) / run_name)):
        if table.get(info["percent"]) is not None:  # released meanwhile by the run of an earlier milestone
            continue
        pause = f"{run_name}: pretraining paused at {info['percent']}% for its milestone run (fine-tune, evaluation, release)"
        update_progress_artifact(artifact_id=progress_id, progress=float(info["percent"]), description=pause)
        emit_progress_line(run_name, pause)
        run_milestone(milestone_parameters(run_name, info, settings))
        done.append(info["percent"])
    if done:
        update_progress_artifact(artifact_id=progress_id, progress=float(done[-1]),
                                 description=f"{run_name}: tokens seen / token budget (milestones {', '.join(f'{p}%' for p in done)} "
                                             f"released; pretraining resumed)")
    return done


@flow(name="pretrain", log_prints=True)
def pretrain(
    run_name: str,
    preset: str = "tiny",
    source: str = SAMPLE_SOURCE,
    revision: str = "main",
    splits: list[str] = ["train", "validation"],  # noqa: B006 - Prefect parameters are immutable copies
    fraction: float = 1.0,
    workers: int = 2,
    gpus_per_worker: float = 0,
    tokenize_workers: int = 0,
    token_budget: int | None = None,
    milestone_mode: Literal["auto", "shared", "dedicated"] = "auto",
    milestones: MilestoneSettings | None = None,
    state_dir: str | None = None,
) -> dict:
    """Pretrain `preset` on `source` as run `run_name` (the resume key), with a milestone run at every 10%.

    Args:
        run_name: names the run's checkpoints, MLflow run and milestone runs; the same name resumes.
        preset: run preset (`tiny`, `7b`, or a model preset name for short runs).
        source: "sample" (built offline), a Hub dataset repo id, or a local/fsspec folder in SlimPajama layout.
        revision: Hub revision to pin.
        splits: splits to download and tokenize.
        fraction: deterministic fraction of the files (smoke runs).
        workers, gpus_per_worker: Ray Train workers and GPUs each (0 GPUs = CPU with gloo); 0 workers trains
            in the flow run's own process, without Ray (`rwkv5.train.launch.run_training`).
        tokenize_workers: tokenizer processes (0 = one per core).
        token_budget: override the preset's token budget.
        milestone_mode: "dedicated" runs each milestone (fine-tune, evaluation, release) beside pretraining,
            started by the milestone event; "shared" stops pretraining at each milestone, runs the milestone on
            the freed GPUs and resumes; "auto" picks dedicated where the cluster holds pretraining and one
            fine-tune at once, else shared (the preflight table says which, and why).
        milestones: what each milestone run does (`rwkv5.train.milestone_settings.MilestoneSettings`: fine-tune
            workers, GPUs and steps, chat data, LAMBADA, evaluation size, release target). Default: its defaults.
        state_dir: where data, checkpoints and releases live. Default: $RWKV5_HOME or ./.state.
    """
    layout = Layout.default(state_dir)
    name = "sample" if source == SAMPLE_SOURCE else source
    raw = str(layout.source_dir(name))
    settings = settings_from(milestones).for_run(name, gpus_per_worker)
    batch = run_preset(preset).batch
    mode = preflight_stage(run_name, {
        "workers": workers, "gpus_per_worker": gpus_per_worker, "source": source,
        "storage": str(layout.checkpoints), "data_dir": str(layout.root / "data"), "state_dir": str(layout.root),
        "revision": revision, "splits": tuple(splits), "fraction": fraction, "milestone_mode": milestone_mode,
        "finetune_workers": settings.finetune_workers, "finetune_gpus_per_worker": settings.gpus_per_worker,
        "micro_batch": batch.micro_batch, "global_batch": batch.global_batch})
    if source == SAMPLE_SOURCE:
        source = build_sample_stage(str(layout.source_dir("sample-build")))
    download_stage(source, raw, splits, fraction, revision)
    tokenize_stage(raw, str(layout.tokens_dir(name)), tokenize_workers)
    progress_id = run_dashboard(run_name)
    train = (run_name, preset, str(layout.tokens_dir(name) / "train"), str(layout.checkpoints), workers,
             gpus_per_worker, token_budget, progress_id, settings)
    if mode == "dedicated":
        return pretrain_stage(*train, shared=False)
    result = None
    while True:  # shared: milestone runs first (one a crashed attempt left too), then on to the next milestone
        milestone_runs_stage(run_name, str(layout.checkpoints), str(layout.milestone_results(run_name)), settings,
                             progress_id)
        if result is not None and result["finished"]:
            return result
        result = pretrain_stage(*train, shared=True)
