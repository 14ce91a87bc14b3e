"""The `milestone` flow: fine-tune, evaluate and release one pretraining milestone.

Triggered by the `rwkv5.pretrain.milestone` event (see prefect.yaml); the deployment's concurrency limit of 1
with ENQUEUE keeps milestones in order. Each stage skips work that is already done, so a retried or re-sent
milestone never releases twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.paths import Layout, artifact_key
from flows.plots import read_trace

__all__ = ["milestone"]


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@task(name="fine-tune", retries=1)
def finetune_stage(checkpoint: str, out_path: str, chat_data: str | None, steps: int) -> dict:
    from data_prep.chat_sample import build_chat_sample
    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import load_checkpoint, save_checkpoint
    from rwkv5.finetune import finetune, read_chat_jsonl

    out = Path(out_path)
    done = out.with_suffix(".json")
    if out.is_file() and done.is_file():
        return json.loads(done.read_text())
    import torch

    model, meta = load_checkpoint(checkpoint, dtype=torch.float32)
    chat = chat_data or str(build_chat_sample(out.parent / "chat-sample.jsonl"))
    result = finetune(model, read_chat_jsonl(chat), load_tokenizer().encode, steps=steps)
    save_checkpoint(model, out, {**meta, "finetuned_on": chat, "finetune_steps": steps})
    summary = {"checkpoint": str(out), "first_loss": result.first_loss, "last_loss": result.last_loss,
               "assistant_tokens": result.assistant_tokens}
    done.write_text(json.dumps(summary))
    return summary


@task(name="evaluate", retries=1)
def evaluate_stage(checkpoint: str, validation_dir: str, ctx_len: int, max_windows: int) -> dict:
    import torch

    from rwkv5.checkpoint import load_checkpoint
    from rwkv5.evaluate import validation_loss

    model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    return validation_loss(model, validation_dir, ctx_len=ctx_len, max_windows=max_windows).to_dict()


@task(name="release", retries=2, retry_delay_seconds=10)
def release_stage(base: str, finetune: str, to: str, name: str, evals: dict, meta: dict,
                  loss_history: list[tuple[float, float]], register_as: str | None) -> dict:
    """Base and fine-tune in one release (idempotent: a complete release is verified, not uploaded again)."""
    from rwkv5.release import release

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
    eval_ctx_len: int = 128,
    eval_max_windows: int = 64,
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
        finetune_steps: optimizer steps of the fine-tune.
        eval_ctx_len, eval_max_windows: validation window length and count.
        release_to: where releases go: a folder or fsspec URL (one sub-folder per milestone) or a Hub repo
            `hf://org/name` (one branch per milestone). Default: the state directory's releases/<run>/.
        state_dir: the state directory. Default: $RWKV5_HOME or ./.state.
    """
    layout = Layout.default(state_dir)
    logger = get_run_logger()
    base = str(_local_path(checkpoint_uri))
    tag = f"m{percent:03d}"
    release_root = layout.releases(run) / tag
    ft = finetune_stage(base, str(release_root.parent / ".work" / f"{tag}-finetune.safetensors"), chat_data,
                        finetune_steps)
    val = str(layout.tokens_dir(data_source) / "validation")
    evals_base = evaluate_stage(base, val, eval_ctx_len, eval_max_windows)
    evals_ft = evaluate_stage(ft["checkpoint"], val, eval_ctx_len, eval_max_windows)
    meta = {"run": run, "percent": percent, "step": step, "tokens_seen": tokens_seen}
    trace = read_trace(layout.checkpoints / run / "trace.jsonl")
    if not release_to:
        target = str(release_root)
    elif release_to.startswith("hf://"):
        target = f"{release_to}@{tag}"  # one branch per milestone of one Hub repo
    else:
        target = f"{release_to.rstrip('/')}/{tag}"
    released = release_stage(
        base, ft["checkpoint"], target, f"{run}-{tag}",
        {"base": {"val_loss": evals_base["loss"], "val_ppl": evals_base["ppl"]},
         "finetune": {"val_loss": evals_ft["loss"], "val_ppl": evals_ft["ppl"], "sft_loss_last": ft["last_loss"]}},
        # The curve up to this milestone only: the release's inputs must not change while training goes on.
        meta, [(row["step"], row["loss"]) for row in trace if row["step"] < step],
        f"rwkv5-{run}" if os.environ.get("MLFLOW_TRACKING_URI") else None,
    )
    row = {"percent": percent, "step": step, "tokens_seen": tokens_seen,
           "val_loss_base": round(evals_base["loss"], 4), "val_loss_finetune": round(evals_ft["loss"], 4),
           "sft_loss": round(ft["last_loss"], 4), "release": released["url"]}
    results = layout.milestone_results(run)
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / f".{tag}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(row))
    os.replace(tmp, results / f"{tag}.json")
    create_table_artifact(key=artifact_key("milestones", run), table=_milestone_table(results),
                          description=f"{run}: milestones, losses and releases")
    logger.info("milestone %s %d%%: released %s", run, percent, released["url"])
    return row
