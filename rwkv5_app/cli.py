"""`rwkv5`: the verbs people run by hand. Knobs live in presets and config files, not in flags.

Each command is a thin call into the library; the project's errors (PipelineError, the base of data_prep's
and rwkv5's) become one-line messages and exit code 1.
"""

from __future__ import annotations

import functools
import sys

import typer

from rwkv5.errors import PipelineError, Rwkv5Error

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Download, build and tokenize data.")
app.add_typer(data_app, name="data")


def one_line_errors(fn):
    """Turn our typed errors into `error: ...` on stderr and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@one_line_errors
def params(preset: str = typer.Option("7b", help="Model preset name.")) -> None:
    """Print the exact parameter count of a model preset (computed, nothing allocated)."""
    from rwkv5.config import count_parameters, model_preset

    typer.echo(count_parameters(model_preset(preset)))


@app.command()
@one_line_errors
def plan(
    preset: str = typer.Option("7b", help="Run preset name."),
    gpus: int = typer.Option(8, help="Data-parallel GPUs (ZeRO-2 partitions over them)."),
    gpu_memory: float = typer.Option(80.0, help="Memory of one GPU in GB."),
    mfu: float | None = typer.Option(None, help="MFU of the expected speed. Default: the recorded 7b-width measurement."),
    precision: str | None = typer.Option(None, help="bf16 or fp8 block matmuls. Default: the preset's."),
) -> None:
    """Print a run preset's memory per GPU under ZeRO-2 and its recipe: batch, steps, expected speed, checkpoints."""
    from rwkv5.train.config import run_preset, with_overrides
    from rwkv5.train.memory_plan import format_plan, plan_memory
    from rwkv5.train.recipe import format_recipe, plan_recipe

    cfg = run_preset(preset)
    if precision is not None:
        cfg = with_overrides(cfg, {"precision": precision})
    typer.echo(format_plan(plan_memory(cfg, gpus, gpu_memory)))
    typer.echo(format_recipe(plan_recipe(cfg, gpus, mfu)))


@data_app.command("download")
@one_line_errors
def data_download(
    out: str = typer.Option(..., help="Destination folder (keeps manifest.json; re-runs resume there)."),
    source: str = typer.Option("cerebras/SlimPajama-627B", help="Hub dataset repo id, local folder or fsspec URL."),
    revision: str = typer.Option("", help="Hub revision. Default: the pinned SlimPajama commit."),
    split: list[str] = typer.Option([], help="Split folder(s): train, validation, test. Default: all."),
    chunk: list[int] = typer.Option([], help="Chunk number(s) within the splits. Default: all."),
    glob: list[str] = typer.Option([], help="fnmatch pattern(s) over paths. Default: *.jsonl.zst."),
    fraction: float = typer.Option(1.0, help="Deterministic fraction of the matching files (smoke runs)."),
    seed: int = typer.Option(0, help="Changes which files --fraction keeps."),
    workers: int = typer.Option(8, help="Files fetched concurrently."),
    verify_existing: bool = typer.Option(False, help="Re-hash files the manifest already lists."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Download (or copy) SlimPajama files and verify each one's sha256. The token comes from HF_TOKEN."""
    from data_prep.download import download
    from data_prep.source import DEFAULT_REVISION, Selection, open_source

    selection = Selection(splits=tuple(split), chunks=tuple(chunk), fraction=fraction, seed=seed,
                          **({"globs": tuple(glob)} if glob else {}))
    summary = download(open_source(source, revision or DEFAULT_REVISION), out, selection, workers=workers,
                       verify_existing=verify_existing, progress=progress)
    typer.echo(f"{summary.selected} files selected: downloaded {summary.downloaded}, already verified "
               f"{summary.skipped}, adopted {summary.adopted}; {summary.bytes_received / 2**20:.1f} MiB in "
               f"{summary.seconds:.1f} s; manifest {summary.manifest}")


@app.command()
def up(
    state_dir: str = typer.Option(None, help="State directory. Default: $RWKV5_HOME or ./.state."),
    deploy: bool = typer.Option(True, help="Apply prefect.yaml's deployments once the server is up."),
    set_profile: bool = typer.Option(
        True, help="Point the active Prefect profile at this server, so a plain `prefect deployment run` works."),
) -> None:
    """Start the local stack (Prefect server + worker, MLflow, Ray head) where not already running."""
    from pathlib import Path

    from rwkv5_app.stack import StackConfig, StackError, is_failure, point_prefect_profile, up as stack_up

    cfg = StackConfig(state_dir=Path(state_dir).resolve()) if state_dir else StackConfig()
    prefect_yaml = Path("prefect.yaml")
    try:
        started = stack_up(cfg, deploy=prefect_yaml if deploy and prefect_yaml.exists() else None)
    except StackError as exc:
        for name, state in exc.states.items():
            typer.echo(f"{name:16s} {state}", err=is_failure(state))
        raise typer.Exit(1) from None
    for name, state in started.items():
        typer.echo(f"{name:16s} {state}")
    if set_profile:
        typer.echo(f"Prefect profile {point_prefect_profile(cfg)!r}: PREFECT_API_URL={cfg.prefect_api_url}")
    typer.echo(f"Prefect UI   http://{cfg.host}:{cfg.prefect_port}")
    typer.echo(f"MLflow       {cfg.mlflow_url}")
    typer.echo(f"Ray          {cfg.ray_dashboard_url}")
    typer.echo(f"export PREFECT_API_URL={cfg.prefect_api_url} MLFLOW_TRACKING_URI={cfg.mlflow_url}")


@app.command()
def down(state_dir: str = typer.Option(None, help="State directory used by `rwkv5 up`.")) -> None:
    """Stop exactly the processes `rwkv5 up` started."""
    from pathlib import Path

    from rwkv5_app.stack import StackConfig, down as stack_down

    cfg = StackConfig(state_dir=Path(state_dir).resolve()) if state_dir else StackConfig()
    for name, state in stack_down(cfg).items():
        typer.echo(f"{name:16s} {state}")


@app.command()
def status(state_dir: str = typer.Option(None, help="State directory used by `rwkv5 up`.")) -> None:
    """Report each local service: pid, health and URL; exits 1 if any is down."""
    from pathlib import Path

    from rwkv5_app.stack import StackConfig, status as stack_status

    cfg = StackConfig(state_dir=Path(state_dir).resolve()) if state_dir else StackConfig()
    rows = stack_status(cfg)
    for row in rows:
        state = "up" if row["healthy"] else "down"
        typer.echo(f"{row['service']:16s} {state:5s} pid={row['pid']} {row['url']}")
    if not all(row["healthy"] for row in rows):
        raise typer.Exit(1)


@data_app.command("tokenize")
@one_line_errors
def data_tokenize(
    src: str = typer.Option(..., help="Source root in SlimPajama layout (train/chunk1/*.jsonl.zst, ...)."),
    out: str = typer.Option(..., help="Output root: one dataset folder per split; re-runs resume there."),
    workers: int = typer.Option(0, help="Processes (spawned). Default: one per core."),
    shard_tokens: int = typer.Option(1 << 25, help="Target shard size in tokens."),
    max_bad_line_fraction: float = typer.Option(0.001, help="Error budget: bad lines per line read."),
    max_quarantined_fraction: float = typer.Option(0.001, help="Error budget: unreadable files per file."),
    summary_json: str = typer.Option("", help="Also write the stage summary as JSON to this path."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Tokenize .jsonl.zst files into uint16 Arrow shards with a manifest per split."""
    import json

    from data_prep.tokenize import TokenizeConfig, tokenize

    try:
        config = TokenizeConfig(workers=workers, shard_tokens=shard_tokens, progress=progress,
                                max_bad_line_fraction=max_bad_line_fraction,
                                max_quarantined_fraction=max_quarantined_fraction)
        summary = tokenize(src, out, config)
    except ValueError as exc:  # TokenizeConfig checks its fields with plain ValueError
        raise PipelineError(str(exc)) from None
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary.to_json(), fh, indent=1)
    typer.echo(summary.to_markdown())
    typer.echo("manifests: " + ", ".join(f"{k}={v}" for k, v in summary.manifests.items()))


@data_app.command("sample")
@one_line_errors
def data_sample(
    out: str = typer.Option(..., help="Output folder (SlimPajama layout); a complete build there is left alone."),
    megabytes: float = typer.Option(3.0, help="Approximate uncompressed text, both splits together, in MB."),
    train_chunks: int = typer.Option(2, help="Number of train/chunk{n} folders."),
    train_files_per_chunk: int = typer.Option(4, help="Files per train chunk."),
    validation_chunks: int = typer.Option(2, help="Number of validation/chunk{n} folders."),
    validation_files_per_chunk: int = typer.Option(2, help="Files per validation chunk."),
    seed: int = typer.Option(0, help="Seed of the document shuffle."),
) -> None:
    """Build a small SlimPajama-layout corpus from the Python standard library (offline, deterministic)."""
    from data_prep.sample import SampleSpec, build_sample

    spec = SampleSpec(megabytes=megabytes, train_chunks=train_chunks,
                      train_files_per_chunk=train_files_per_chunk, validation_chunks=validation_chunks,
                      validation_files_per_chunk=validation_files_per_chunk, seed=seed)
    result = build_sample(out, spec)
    totals = result.totals
    verb = "already complete" if result.skipped else "built"
    typer.echo(f"{result.out}: {verb}; {totals['files']} files, {totals['documents']} documents, "
               f"{totals['text_bytes'] / 1e6:.2f} MB of text ({totals['compressed_bytes'] / 1e6:.2f} MB compressed); "
               f"manifest {result.out / 'manifest.json'}")


@app.command()
@one_line_errors
def init(
    out: str = typer.Option(..., help="Checkpoint file to write (native safetensors)."),
    preset: str = typer.Option("tiny", help="Model preset name."),
    seed: int = typer.Option(0, help="Seed of the initialisation."),
) -> None:
    """Write a freshly initialised model as a native checkpoint."""
    import torch

    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.config import count_parameters, model_preset
    from rwkv5.model import RWKV5

    cfg = model_preset(preset)
    torch.manual_seed(seed)
    path = save_checkpoint(RWKV5(cfg), out, {"preset": preset, "seed": seed, "tokens_seen": 0})
    typer.echo(f"{path}: freshly initialised {preset} model, {count_parameters(cfg)} parameters")


def _load_for_inference(ckpt: str):
    """A native checkpoint, or an RWKV-LM .pth by its suffix, as an fp32 eval model on the best device."""
    import torch

    from rwkv5.checkpoint import load_checkpoint, load_rwkv_pth

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if ckpt.endswith(".pth"):
        return load_rwkv_pth(ckpt, device, torch.float32)
    return load_checkpoint(ckpt, device, torch.float32)[0]


@app.command()
@one_line_errors
def generate(
    ckpt: str = typer.Option(..., help="Native checkpoint, or an RWKV-LM / rwkv-package .pth."),
    prompt: str = typer.Option("", help="Text to continue. Empty: start a new document."),
    context_file: str = typer.Option(None, help="UTF-8 text fed before the prompt, streamed in chunks."),
    max_tokens: int = typer.Option(100, help="Most tokens to generate."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.85, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, help="Seed for reproducible sampling."),
) -> None:
    """Print a continuation of the prompt sampled from a checkpoint (RNN mode, constant memory)."""
    from data_prep.tokenizer import load_tokenizer

    from rwkv5.infer import generate as generate_ids
    from rwkv5.infer import iter_file_ids, prefill

    model = _load_for_inference(ckpt)
    tokenizer = load_tokenizer()
    context = prefill(model, iter_file_ids(context_file, tokenizer)) if context_file else None
    pending: list[int] = []
    for token in generate_ids(model, tokenizer, prompt, max_tokens, temperature, top_p, seed, context):
        pending.append(token)
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):  # otherwise wait: the next id may complete the character
            typer.echo(text, nl=False)
            pending = []
    typer.echo(tokenizer.decode(pending) if pending else "")


@app.command()
@one_line_errors
def export(
    ckpt: str = typer.Option(..., help="Native checkpoint to export."),
    fmt: str = typer.Option(..., "--format", help="rwkv-pth (a file for the rwkv package) or safetensors (a folder)."),
    out: str = typer.Option(..., help="Output file (rwkv-pth) or folder (safetensors)."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
) -> None:
    """Export a checkpoint for other tools: the `rwkv` package's .pth, or safetensors with config.json."""
    from rwkv5.errors import ConfigError
    from rwkv5.export import DTYPES, export_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"export.dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    path = export_checkpoint(ckpt, fmt, out, DTYPES[dtype])
    typer.echo(f"{path}: exported {ckpt} as {fmt} ({dtype})")


@app.command()
@one_line_errors
def train(
    preset: str = typer.Option(..., help="Run preset: tiny, 7b (or a model preset name for a benchmark run)."),
    data: str = typer.Option(..., help="Token dataset directory (manifest.json) every worker can read."),
    run_name: str = typer.Option(..., help="The resume key: checkpoints go to STORAGE/RUN_NAME."),
    storage: str = typer.Option("runs", help="Checkpoint root every worker can write."),
    workers: int = typer.Option(1, help="Ray Train workers (Ray of RAY_ADDRESS, or a local one); 0 trains in "
                                           "this process (or in each torchrun process) without Ray."),
    gpus_per_worker: float = typer.Option(0, help="0: CPU with gloo; 1: one GPU per worker with NCCL; 0.5 shares one."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run that already has checkpoints."),
    init_missing: bool = typer.Option(False, "--init-missing",
                                      help="Resume from a checkpoint lacking parameters, initialising them fresh."),
) -> None:
    """Pretrain with DeepSpeed ZeRO-2 in bf16 on Ray Train workers, resuming by run name."""
    from rwkv5.train.config import run_preset
    from rwkv5.train.launch import run_training

    metrics = run_training(run_preset(preset), run_name, data, storage, workers=workers,
                           gpus_per_worker=gpus_per_worker, resume=resume, init_missing=init_missing)
    typer.echo(f"{run_name}: finished at step {metrics.get('step')} ({metrics.get('tokens_seen')} tokens)")


@app.command()
@one_line_errors
def demo(
    state_dir: str = typer.Option(".state/demo", help="Where the sample, shards, checkpoints and export go."),
    workers: int = typer.Option(2, help="Ray Train workers (CPU, gloo)."),
    prompt: str = typer.Option("The", help="Prompt for the generation at the end."),
) -> None:
    """The embedded demo without servers: sample -> tokenize -> pretrain tiny (Ray + DeepSpeed) -> generate.

    Re-running it skips the finished stages and resumes training by run name.
    """
    from pathlib import Path

    from data_prep.sample import build_sample
    from data_prep.tokenize import TokenizeConfig, tokenize
    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import load_checkpoint
    from rwkv5.infer import generate as generate_ids
    from rwkv5.train.checkpoint import list_checkpoints
    from rwkv5.train.config import run_preset
    from rwkv5.train.launch import run_training

    # The pretrain flow's steps without Prefect: the same library calls, in order; nothing else is decided here.
    root = Path(state_dir).resolve()
    typer.echo("1/4 building the SlimPajama-format sample")
    build_sample(root / "raw")
    typer.echo("2/4 tokenizing")
    summary = tokenize(root / "raw", root / "tokens", TokenizeConfig(progress=False))
    typer.echo(f"    {summary.tokens:,} tokens in {summary.shards} shards")
    typer.echo(f"3/4 pretraining the tiny preset on {workers} Ray workers")
    storage = root / "checkpoints"
    resume = bool(list_checkpoints(storage / "demo"))
    run_training(run_preset("tiny"), "demo", root / "tokens" / "train", storage, workers=workers, resume=resume)
    final = sorted((storage / "demo" / "milestones").glob("m*/model.safetensors"))[-1]
    typer.echo(f"    final milestone checkpoint: {final}")
    typer.echo("4/4 generating")
    model, _ = load_checkpoint(final)
    model = model.float()
    tokenizer = load_tokenizer()
    ids = list(generate_ids(model, tokenizer, prompt, max_new_tokens=40, temperature=1.0, top_p=0.7, seed=0))
    typer.echo(prompt + tokenizer.decode(ids))


@app.command()
@one_line_errors
def release(
    checkpoint: str = typer.Argument(..., help="The milestone's native checkpoint (the base model)."),
    to: str = typer.Option(..., "--to", help="Local folder, fsspec URL (s3://...) or hf://org/name[@branch]."),
    name: str = typer.Option("", help="Release name. Default: the checkpoint's folder name."),
    finetune: str = typer.Option("", help="The fine-tuned checkpoint released alongside."),
    evals: str = typer.Option("", help="JSON file: {metric: value} or {variant: {metric: value}}."),
    loss_history: str = typer.Option("", help="JSON file: [[tokens_or_step, loss], ...] for the loss curve."),
    public: bool = typer.Option(False, "--public", help="Create a public Hub repo (default: private)."),
    register: str = typer.Option("", help="MLflow registered-model name (server from MLFLOW_TRACKING_URI)."),
) -> None:
    """Release a milestone (weights, card, manifest) to a folder, fsspec URL or the Hub. Idempotent.

    The Hub token comes from HF_TOKEN; S3 credentials and endpoint from the usual AWS variables.
    """
    import json
    from pathlib import Path

    from rwkv5.release.publish import release as do_release

    def read_json(path: str):
        try:
            return json.loads(Path(path).read_text()) if path else None
        except (OSError, ValueError) as exc:
            raise Rwkv5Error(f"{path}: not a readable JSON file: {exc}") from None

    history = read_json(loss_history)
    report = do_release(
        checkpoint, to, name=name or Path(checkpoint).resolve().parent.name, finetune=finetune or None,
        evals=read_json(evals), loss_history=[tuple(x) for x in history] if history else None,
        private=not public, register_as=register or None,
    )
    if report.uploaded:
        typer.echo(f"{report.url}: uploaded {len(report.uploaded)} files")
    else:
        typer.echo(f"{report.url}: already complete, nothing uploaded")
    if report.model_version is not None:
        typer.echo(f"registered as {report.model_version.name} version {report.model_version.version}")


@app.command("eval")
@one_line_errors
def eval_(
    checkpoint: str = typer.Argument(..., help="Native checkpoint, or an RWKV-LM / rwkv-package .pth."),
    lambada: str = typer.Option(None, help="LAMBADA (OpenAI) JSONL file, or 'shipped' (the package's copy): last-word accuracy and perplexity."),
    validation: str = typer.Option(None, help="Tokenized validation split: loss and perplexity per source."),
    limit: int = typer.Option(None, help="Only the first N LAMBADA passages / validation windows."),
    out: str = typer.Option(None, help="JSON report path. Default: CHECKPOINT's name + .eval.json."),
    mlflow_run_id: str = typer.Option(None, help="Log into this MLflow run (e.g. the milestone's)."),
    tracking_uri: str = typer.Option(None, help="MLflow server. Default: MLFLOW_TRACKING_URI if set."),
) -> None:
    """Evaluate a checkpoint: print a table, write a JSON report, and log to MLflow when one is given."""
    import os

    from rwkv5.errors import ConfigError
    from rwkv5.eval.evaluate import evaluate_checkpoint, format_table, write_report
    from rwkv5.tracking import log_eval_report

    if not lambada and not validation:
        raise ConfigError("eval: give --lambada FILE and/or --validation SHARDS")
    model = _load_for_inference(checkpoint)
    encode = None
    if lambada:
        from data_prep.tokenizer import load_tokenizer

        encode = load_tokenizer().encode
    report = evaluate_checkpoint(model, encode, lambada=lambada, validation=validation, limit=limit)
    report["checkpoint"] = checkpoint
    typer.echo(format_table(report))
    path = write_report(report, out or f"{checkpoint}.eval.json")
    typer.echo(f"report: {path}")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_run_id or tracking_uri:
        run_id = log_eval_report(report, run_id=mlflow_run_id, tracking_uri=tracking_uri)
        typer.echo(f"mlflow run: {run_id}")


def main() -> None:  # pragma: no cover - console entry for `python -m rwkv5_app.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
