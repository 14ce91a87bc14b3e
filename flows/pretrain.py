"""The `pretrain` flow: download -> tokenize -> pretrain. Each task is one call into the libraries.

Every stage is idempotent (verified files, finished shards and the latest checkpoint are kept), so a re-run
of the same deployment skips what is done and resumes training. Milestones emit Prefect events from the
training workers; the `milestone` deployment's trigger runs the fine-tune/eval/release without making
pretraining wait.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from flows.events import PrefectMilestoneEvents, PrefectProgress, budget_percent
from flows.paths import Layout, artifact_key
from flows.plots import image_markdown, loss_curve_png, read_trace

__all__ = ["pretrain", "SAMPLE_SOURCE", "HUB_SOURCE"]

SAMPLE_SOURCE = "sample"
"""Build the offline SlimPajama-format sample and use it as the source (the embedded demo)."""
HUB_SOURCE = "cerebras/SlimPajama-627B"


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
def pretrain_stage(run_name: str, preset: str, data_dir: str, storage: str, workers: int, gpus_per_worker: int,
                   token_budget: int | None, finetune_workers: int = 1) -> dict:
    from rwkv5.train import run_preset, with_overrides
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.launch import launch, train_here

    config = run_preset(preset)
    if token_budget:
        config = with_overrides(config, {"token_budget": token_budget})
    progress_id = create_progress_artifact(progress=0.0, key=artifact_key("budget", run_name),
                                           description=f"{run_name}: tokens seen / token budget")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        create_link_artifact(key=artifact_key("mlflow", run_name), link=mlflow_uri, link_text="MLflow runs")
    ray_dashboard = os.environ.get("RWKV5_RAY_DASHBOARD")
    if ray_dashboard:
        create_link_artifact(key=artifact_key("ray", run_name), link=ray_dashboard, link_text="Ray dashboard")
    resume = bool(list_checkpoints(Path(storage) / run_name))  # a re-run of the same run continues it
    get_run_logger().info("pretrain %s (%s preset, %d steps), resume=%s", run_name, preset, config.total_steps, resume)
    trace = Path(storage) / run_name / "trace.jsonl"
    callbacks = [PrefectMilestoneEvents(run_name=run_name, finetune_workers=finetune_workers,
                                        gpus_per_worker=gpus_per_worker),
                 PrefectProgress(artifact_id=str(progress_id)),
                 TraceCallback(trace)]
    if workers == 0:  # in this flow run's process (the CPU demo): no Ray Train start-up
        state = train_here(config, run_name, data_dir, storage, resume=resume, callbacks=callbacks,
                           use_gpu=gpus_per_worker > 0)
        metrics = {"step": state.step, "tokens_seen": state.tokens_seen, "applied": state.applied}
    else:
        result = launch(config, run_name, data_dir, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                        resume=resume, callbacks=callbacks)
        if result.error is not None:
            raise RuntimeError(f"pretraining {run_name} failed: {result.error}")
        metrics = dict(result.metrics or {})
    if metrics.get("tokens_seen") is not None:  # also when a re-run found nothing left to train
        update_progress_artifact(artifact_id=progress_id,
                                 progress=budget_percent(metrics["tokens_seen"], config.token_budget))
    publish_loss_curve(run_name, trace)
    return {"run_name": run_name, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def publish_loss_curve(run_name: str, trace: Path) -> None:
    """The loss curve as an image artifact (and into the run's MLflow run when a server is configured)."""
    rows = read_trace(trace)
    if not rows:
        return
    png = loss_curve_png(rows, f"{run_name}: training loss")
    last = rows[-1]
    create_markdown_artifact(
        key=artifact_key("loss-curve", run_name),
        markdown=f"### {run_name}: training loss\n\n{image_markdown(png, 'training loss')}\n\n"
                 f"{len(rows)} steps, last loss {last['loss']:.4f} at step {last['step']}.",
        description="Training loss by optimizer step",
    )
    image = trace.with_name("loss_curve.png")
    tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, image)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        from rwkv5.train.callbacks import MLflowCallback

        found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                   filter_string=f"tags.`{MLflowCallback.TAG}` = '{run_name}'")
        if found:
            mlflow.MlflowClient().log_artifact(found[0].info.run_id, str(image))


@flow(name="pretrain", log_prints=True)
def pretrain(
    run_name: str,
    preset: str = "tiny",
    source: str = SAMPLE_SOURCE,
    revision: str = "main",
    splits: list[str] = ["train", "validation"],  # noqa: B006 - Prefect parameters are immutable copies
    fraction: float = 1.0,
    workers: int = 2,
    gpus_per_worker: int = 0,
    tokenize_workers: int = 0,
    token_budget: int | None = None,
    finetune_workers: int = 1,
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
            in the flow run's own process, without Ray (the CPU demo: Ray Train's start-up is most of its time).
        tokenize_workers: tokenizer processes (0 = one per core).
        token_budget: override the preset's token budget.
        finetune_workers: Ray Train workers of each milestone fine-tune (with `gpus_per_worker` GPUs each);
            0 fine-tunes in the milestone flow's own process (the CPU demo: no worker start-up per milestone).
        state_dir: where data, checkpoints and releases live. Default: $RWKV5_HOME or ./.state.
    """
    layout = Layout.default(state_dir)
    name = "sample" if source == SAMPLE_SOURCE else source
    raw = str(layout.source_dir(name))
    if source == SAMPLE_SOURCE:
        source = build_sample_stage(str(layout.source_dir("sample-build")))
    download_stage(source, raw, splits, fraction, revision)
    tokenize_stage(raw, str(layout.tokens_dir(name)), tokenize_workers)
    return pretrain_stage(run_name, preset, str(layout.tokens_dir(name) / "train"), str(layout.checkpoints),
                          workers, gpus_per_worker, token_budget, finetune_workers)
