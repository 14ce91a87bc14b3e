"""The `pretrain` flow: download -> tokenize -> pretrain. Each task is one call into the libraries.

Every stage is idempotent (verified files, finished shards and the latest checkpoint are kept), so a re-run
of the same deployment skips what is done and resumes training. Milestones emit Prefect events from the
training workers; the `milestone` deployment's trigger runs the fine-tune/eval/release without making
pretraining wait.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

from flows.artifacts import publish_loss_curve, run_dashboard
from flows.events import PrefectMilestoneEvents, PrefectProgress, budget_percent
from flows.paths import Layout, artifact_key

__all__ = ["pretrain", "SAMPLE_SOURCE", "HUB_SOURCE"]

SAMPLE_SOURCE = "sample"
"""Build the offline SlimPajama-format sample and use it as the source (the embedded demo)."""
HUB_SOURCE = "cerebras/SlimPajama-627B"


@task(name="preflight")
def preflight_stage(run_name: str, needs: dict) -> list[dict]:
    """Cluster GPUs, shared paths, disk, Hub access, CUDA kernel: one line per failure, before any download."""
    from rwkv5.train.preflight import RunNeeds, run_preflight

    report = run_preflight(RunNeeds(**needs))
    create_table_artifact(key=artifact_key("preflight", run_name), table=report.rows(),
                          description=f"{run_name}: preflight checks")
    report.raise_if_failed()
    return report.rows()


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
                   token_budget: int | None, finetune_workers: int = 1, lambada: str = "",
                   eval_limit: int = 64, data_source: str = SAMPLE_SOURCE, finetune_steps: int = 10) -> dict:
    """Train (or resume) the run; milestone events, the budget bar and the trace come from its callbacks."""
    from rwkv5.train import run_preset, with_overrides
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.launch import run_training

    config = run_preset(preset)
    if token_budget:
        config = with_overrides(config, {"token_budget": token_budget})
    progress_id = run_dashboard(run_name)
    resume = bool(list_checkpoints(Path(storage) / run_name))  # a re-run of the same run continues it
    get_run_logger().info("pretrain %s (%s preset, %d steps), resume=%s", run_name, preset, config.total_steps, resume)
    trace = Path(storage) / run_name / "trace.jsonl"
    callbacks = [PrefectMilestoneEvents(run_name=run_name, finetune_workers=finetune_workers,
                                        gpus_per_worker=gpus_per_worker, lambada=lambada or "",
                                        eval_limit=eval_limit, data_source=data_source,
                                        finetune_steps=finetune_steps),
                 PrefectProgress(artifact_id=progress_id, run_name=run_name), TraceCallback(trace)]
    metrics = run_training(config, run_name, data_dir, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                           resume=resume, callbacks=callbacks)
    if metrics.get("tokens_seen") is not None:  # also when a re-run found nothing left to train
        update_progress_artifact(artifact_id=progress_id,
                                 progress=budget_percent(metrics["tokens_seen"], config.token_budget))
    publish_loss_curve(run_name, trace)
    return {"run_name": run_name, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


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
    finetune_workers: int = 1,
    lambada: str | None = None,
    eval_limit: int = 64,
    finetune_steps: int = 10,
    state_dir: str | None = None,
) -> dict:
    """Pretrain `preset` on `source` as run `run_name` (the resume key).

    Args:
        run_name: names the run's checkpoints, MLflow run and milestone events; the same name resumes.
        preset: run preset (`tiny`, `7b`, or a model preset name for short runs).
        source: "sample" (built offline), a Hub dataset repo id, or a local/fsspec folder in SlimPajama layout.
        revision: Hub revision to pin.
        splits: splits to download and tokenize.
        fraction: deterministic fraction of the files (smoke runs).
        workers, gpus_per_worker: Ray Train workers and GPUs each (0 GPUs = CPU with gloo); 0 workers trains
            in the flow run's own process, without Ray (`rwkv5.train.launch.run_training`).
        tokenize_workers: tokenizer processes (0 = one per core).
        token_budget: override the preset's token budget.
        finetune_workers: Ray Train workers of each milestone fine-tune (with `gpus_per_worker` GPUs each);
            0 fine-tunes in the milestone flow's own process (the CPU demo: no worker start-up per milestone).
        lambada: LAMBADA file each milestone is scored on: "shipped" (the package's copy), a path or an fsspec
            URL (prefect.yaml: `tiny` the shipped copy, `7b` the Hub's). Default: none. Sent in the milestone event,
            as is `eval_limit`.
        eval_limit: validation windows and LAMBADA passages each milestone evaluation scores (the first ones).
        finetune_steps: optimizer steps of each milestone's chat fine-tune (also sent in the event).
        state_dir: where data, checkpoints and releases live. Default: $RWKV5_HOME or ./.state.
    """
    layout = Layout.default(state_dir)
    name = "sample" if source == SAMPLE_SOURCE else source
    raw = str(layout.source_dir(name))
    preflight_stage(run_name, {"workers": workers, "gpus_per_worker": gpus_per_worker, "source": source,
                               "storage": str(layout.checkpoints), "data_dir": str(layout.root / "data"),
                               "state_dir": str(layout.root), "revision": revision, "splits": tuple(splits),
                               "fraction": fraction})
    if source == SAMPLE_SOURCE:
        source = build_sample_stage(str(layout.source_dir("sample-build")))
    download_stage(source, raw, splits, fraction, revision)
    tokenize_stage(raw, str(layout.tokens_dir(name)), tokenize_workers)
    return pretrain_stage(run_name, preset, str(layout.tokens_dir(name) / "train"), str(layout.checkpoints),
                          workers, gpus_per_worker, token_budget, finetune_workers, lambada or "", eval_limit, name,
                          finetune_steps)
