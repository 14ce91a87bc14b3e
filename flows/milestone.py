"""The `milestone` flow: fine-tune, evaluate and release one pretraining milestone.

Triggered by the `rwkv5.pretrain.milestone` event (see prefect.yaml). Runs go one at a time, in the order the
events created them: the deployment's concurrency limit of 1 (ENQUEUE) guards the slot, and the work queue
`milestones`, limited to 1 by `rwkv5 up`, makes the worker take the earliest waiting run (the deployment limit
alone hands refused runs a later start time each, which reorders them). As a safety net for runs that start
out of order anyway (events processed out of order, a stack without the queue limit), the run holding the slot
also releases every earlier milestone that is ready and has no release yet, so releases follow percent order.
Each stage skips work that is already done, so a retried or re-sent milestone never releases twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.paths import Layout, artifact_key
from flows.plots import read_trace

__all__ = ["milestone"]


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@task(name="fine-tune", retries=1)
def finetune_stage(base: str, storage: str, run_name: str, chat_data: str | None, steps: int, lr: float,
                   max_len: int, workers: int, gpus_per_worker: int) -> dict:
    """Chat SFT of the milestone through the pretraining loop (DeepSpeed ZeRO-2, bf16, segmented state-passing
    loss): on `workers` Ray Train workers of the pipeline's cluster when RAY_ADDRESS is set and `workers` > 0,
    else in this process. A finished fine-tune is reused and an interrupted one resumes from its checkpoint, so
    a retried flow run trains no step twice."""
    from data_prep.chat_sample import build_chat_sample
    from rwkv5.checkpoint import read_checkpoint_config
    from rwkv5.train.finetune import FinetuneTask, finetune_here, finetune_run_config, launch_finetune
    from rwkv5.train.callbacks import TraceCallback
    from rwkv5.train.checkpoint import list_checkpoints

    run_dir = Path(storage) / run_name
    done = run_dir / "milestones" / "m001" / "done.json"  # the fine-tune's one milestone is its last step
    trace = run_dir / "trace.jsonl"
    if not done.is_file():
        model_cfg, _ = read_checkpoint_config(base)
        chat = chat_data or str(build_chat_sample(Path(storage) / "chat-sample.jsonl"))
        cfg = finetune_run_config(model_cfg, steps=steps, samples_per_step=max(2, workers), max_len=max_len, lr=lr,
                                  final_lr=lr / 10, warmup_steps=0)
        task = FinetuneTask(chat_data=chat, init_checkpoint=base)
        if workers > 0 and os.environ.get("RAY_ADDRESS"):
            result = launch_finetune(cfg, task, run_name, storage, workers=workers, gpus_per_worker=gpus_per_worker,
                                     resume=bool(list_checkpoints(run_dir)), callbacks=[TraceCallback(trace)])
            if getattr(result, "error", None) is not None:
                raise RuntimeError(f"fine-tune {run_name} failed: {result.error}")
        else:
            finetune_here(cfg, task, run_name, storage, callbacks=[TraceCallback(trace)])
    rows = read_trace(trace)
    return {"checkpoint": json.loads(done.read_text())["path"], "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "steps": len(rows)}


@task(name="evaluate", retries=1)
def evaluate_stage(checkpoint: str, validation_dir: str, lambada: str | None, ctx_len: int, limit: int) -> dict:
    """Validation loss per source and, given a LAMBADA file, LAMBADA accuracy and perplexity (RNN mode)."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import load_checkpoint
    from rwkv5.eval.evaluate import evaluate_checkpoint

    model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    return evaluate_checkpoint(model.eval(), load_tokenizer().encode, lambada=lambada, validation=validation_dir,
                               limit=limit, ctx_len=ctx_len)


def _local_copy(uri: str, cache_dir: Path) -> str:
    """A local path for `uri` (fsspec URLs such as hf://datasets/... are fetched once into `cache_dir`)."""
    if "://" not in uri or uri.startswith("file://"):
        return str(_local_path(uri))
    import shutil

    import fsspec

    dest = cache_dir / Path(uri.split("://", 1)[1]).name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        with fsspec.open(uri, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)  # streamed: an eval set may not fit in memory
        os.replace(tmp, dest)
    return str(dest)


def _log_evals(run: str, tag: str, evals: dict) -> None:
    """Eval metrics into the milestone's MLflow run (experiment rwkv5-milestones, one run per milestone)."""
    from rwkv5.eval.evaluate import log_to_mlflow

    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("rwkv5-milestones")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("rwkv5-milestones")
    found = client.search_runs([exp_id], f"tags.`rwkv5.milestone` = '{run}-{tag}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=f"{run}-{tag}", tags={"rwkv5.milestone": f"{run}-{tag}", "rwkv5.run_name": run}).info.run_id
    for variant, report in evals.items():
        log_to_mlflow(report, run_id=run_id, prefix=f"eval.{variant}.", artifact_file=f"eval/{variant}.json")
    client.set_terminated(run_id)


@task(name="release", retries=2, retry_delay_seconds=10)
def release_stage(base: str, finetune: str, to: str, name: str, evals: dict, meta: dict,
                  loss_history: list[tuple[float, float]], register_as: str | None) -> dict:
    """Base and fine-tune in one release (idempotent: a complete release is verified, not uploaded again)."""
    from rwkv5.release.publish import release

    report = release(base, to, name=name, finetune=finetune, evals=evals, loss_history=loss_history,
                     extra_meta=meta, register_as=register_as)
    get_run_logger().info("release %s: %d files uploaded", report.url, len(report.uploaded))
    return {"url": report.url, "uploaded": len(report.uploaded)}


def _milestone_table(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        rows.append(json.loads(path.read_text()))
    return sorted(rows, key=lambda r: r["percent"])


@flow(name="milestone", log_prints=True)
def milestone(
    run: str,
    percent: int,
    step: int,
    tokens_seen: int,
    checkpoint_uri: str,
    data_source: str = "sample",
    chat_data: str | None = None,
    finetune_steps: int = 10,
    finetune_lr: float = 1e-4,
    finetune_max_len: int = 1024,
    finetune_workers: int = 1,
    gpus_per_worker: int = 0,
    lambada: str | None = None,
    eval_ctx_len: int = 128,
    eval_limit: int = 64,
    release_to: str | None = None,
    state_dir: str | None = None,
) -> dict:
    """Fine-tune, evaluate and release the milestone at `percent` of run `run`'s token budget.

    Args:
        run: the pretraining run name.
        percent: the milestone, in percent of the token budget.
        step, tokens_seen: where pretraining was.
        checkpoint_uri: the consolidated bf16 milestone checkpoint.
        data_source: source name whose tokenized validation split is evaluated.
        chat_data: chat JSONL for the fine-tune. Default: a small set built from local docstrings.
        finetune_steps, finetune_lr: optimizer steps and peak learning rate of the fine-tune.
        finetune_max_len: longest chat sample kept, in tokens (longer ones are processed in segments).
        finetune_workers, gpus_per_worker: Ray Train workers of the fine-tune (when RAY_ADDRESS is set);
            0 = in this process. The pretraining event sends both.
        lambada: LAMBADA JSONL (a path or fsspec URL, e.g.
            hf://datasets/EleutherAI/lambada_openai/lambada_test_en.jsonl). Default: no LAMBADA score.
        eval_ctx_len: validation window length.
        eval_limit: validation windows and LAMBADA passages scored (the first ones).
        release_to: where releases go: a folder or fsspec URL (one sub-folder per milestone) or a Hub repo
            `hf://org/name` (one branch per milestone). Default: the state directory's releases/<run>/.
        state_dir: the state directory. Default: $RWKV5_HOME or ./.state.
    """
    layout = Layout.default(state_dir)
    settings = _Settings(data_source, chat_data, finetune_steps, finetune_lr, finetune_max_len, finetune_workers,
                         gpus_per_worker, lambada, eval_ctx_len, eval_limit, release_to)
    checkpoint = _local_path(checkpoint_uri)
    pending = _unreleased(layout, run, checkpoint.parent.parent)
    for other in [info for info in pending if info["percent"] < percent]:
        _release_other(layout, run, percent, other, settings)
    own = _result_file(layout, run, percent)
    if own.is_file():  # released by another milestone's run while this one was starting
        row = json.loads(own.read_text())
    else:
        row = _release_milestone(layout, run, percent, step, tokens_seen, str(checkpoint), settings)
    for other in [info for info in pending if info["percent"] > percent]:
        _release_other(layout, run, percent, other, settings)
    return row


def _release_other(layout: Layout, run: str, percent: int, other: dict, settings: _Settings) -> None:
    """Release another milestone of the run; its own run, when it starts, finds the release and only reports it."""
    get_run_logger().info("milestone %s %d%%: releasing milestone %d%%, which has no release yet", run, percent,
                          other["percent"])
    _release_milestone(layout, run, other["percent"], other["step"], other["tokens_seen"], other["path"], settings)


@dataclass(frozen=True)
class _Settings:
    """The milestone flow's knobs, the same for every milestone it releases."""

    data_source: str
    chat_data: str | None
    finetune_steps: int
    finetune_lr: float
    finetune_max_len: int
    finetune_workers: int
    gpus_per_worker: int
    lambada: str | None
    eval_ctx_len: int
    eval_limit: int
    release_to: str | None


def _unreleased(layout: Layout, run: str, milestones_dir: Path) -> list[dict]:
    """The run's milestones whose checkpoints are complete (`done.json`) but that have no result yet, in order.

    Milestone runs normally start in percent order (see the module docstring), but one may not (the server
    processes events two at a time, so two milestones reached within moments may create their runs in either
    order), and on a small machine they fall behind pretraining. So the run that holds the slot releases every
    such milestone, earlier ones before its own and later ones after it: releases follow percent order whatever
    order the runs start in, and a run that starts late finds its milestone released.

    Its waiting runs are not ended early: a state forced on a Scheduled run races the worker, whose refused
    submission sets it back to AwaitingConcurrencySlot (seen in the e2e: such a run started minutes later)."""
    rows = []
    for done in sorted(milestones_dir.glob("m*/done.json")):
        info = json.loads(done.read_text())
        if info.get("percent") is not None and not _result_file(layout, run, info["percent"]).is_file():
            rows.append(info)
    return sorted(rows, key=lambda row: row["percent"])


def _result_file(layout: Layout, run: str, percent: int) -> Path:
    return layout.milestone_results(run) / f"m{percent:03d}.json"


def _release_milestone(layout: Layout, run: str, percent: int, step: int, tokens_seen: int, base: str,
                       settings: _Settings) -> dict:
    """Fine-tune, evaluate and release one milestone; its row of the milestone table."""
    from rwkv5.eval.evaluate import flat_metrics  # imports torch: kept out of the module for cheap flow discovery

    logger = get_run_logger()
    tag = f"m{percent:03d}"
    release_root = layout.releases(run) / tag
    ft = finetune_stage(base, str(layout.finetunes), f"{run}-{tag}", settings.chat_data, settings.finetune_steps,
                        settings.finetune_lr, settings.finetune_max_len, settings.finetune_workers,
                        settings.gpus_per_worker)
    val = str(layout.tokens_dir(settings.data_source) / "validation")
    lambada_file = _local_copy(settings.lambada, layout.root / "eval-data") if settings.lambada else None
    evals = {variant: evaluate_stage(checkpoint, val, lambada_file, settings.eval_ctx_len, settings.eval_limit)
             for variant, checkpoint in (("base", base), ("finetune", ft["checkpoint"]))}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        _log_evals(run, tag, evals)
    meta = {"run": run, "percent": percent, "step": step, "tokens_seen": tokens_seen}
    trace = read_trace(layout.checkpoints / run / "trace.jsonl")
    release_to = settings.release_to
    if not release_to:
        target = str(release_root)
    elif release_to.startswith("hf://"):
        target = f"{release_to}@{tag}"  # one branch per milestone of one Hub repo
    else:
        target = f"{release_to.rstrip('/')}/{tag}"
    card_evals = {variant: flat_metrics(report) for variant, report in evals.items()}
    card_evals["finetune"]["sft_loss_last"] = ft["last_loss"]
    released = release_stage(
        base, ft["checkpoint"], target, f"{run}-{tag}", card_evals,
        # The curve up to this milestone only: the release's inputs must not change while training goes on.
        meta, [(row["step"], row["loss"]) for row in trace if row["step"] < step],
        _registry_name(run, target),
    )
    row = {"percent": percent, "step": step, "tokens_seen": tokens_seen,
           "val_loss_base": round(evals["base"]["validation"]["loss"], 4),
           "val_loss_finetune": round(evals["finetune"]["validation"]["loss"], 4),
           "sft_loss_first": round(ft["first_loss"], 4), "sft_loss_last": round(ft["last_loss"], 4)}
    if lambada_file:
        for variant in ("base", "finetune"):
            row[f"lambada_acc_{variant}"] = round(evals[variant]["lambada"]["accuracy"], 4)
            row[f"lambada_ppl_{variant}"] = round(evals[variant]["lambada"]["ppl"], 2)
    row["release"] = released["url"]
    results = layout.milestone_results(run)
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / f".{tag}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(row))
    os.replace(tmp, _result_file(layout, run, percent))
    create_table_artifact(key=artifact_key("milestones", run), table=_milestone_table(results),
                          description=f"{run}: milestones, losses, eval scores and releases")
    logger.info("milestone %s %d%%: released %s", run, percent, released["url"])
    return row


def _registry_name(run: str, target: str) -> str | None:
    """The MLflow registered model of the run's releases, or None where there is no registry to use.

    MLflow's server refuses a local path as a model version's source (only paths inside a run's artifact
    folder are allowed), so releases to a local folder are not registered; the milestone's MLflow run holds
    their eval metrics, and the milestone table holds their location."""
    from rwkv5.release.publish import registrable

    if not os.environ.get("MLFLOW_TRACKING_URI") or not registrable(target):
        return None
    return f"rwkv5-{run}"
