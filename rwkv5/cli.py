"""`rwkv5`: the verbs people run by hand. Knobs live in presets and config files, not in flags.

Each command is a thin call into the library; library errors (Rwkv5Error) become one-line messages and
exit code 1.
"""

from __future__ import annotations

import functools
import sys

import typer

from rwkv5.errors import Rwkv5Error

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Download, build and tokenize data.")
app.add_typer(data_app, name="data")


def one_line_errors(fn):
    """Turn our typed errors into `error: ...` on stderr and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Rwkv5Error as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@one_line_errors
def params(preset: str = typer.Option("7b", help="Model preset name.")) -> None:
    """Print the exact parameter count of a model preset (computed, nothing allocated)."""
    from rwkv5.config import count_parameters, model_preset

    typer.echo(count_parameters(model_preset(preset)))


@data_app.command("download")
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
    from data_prep.errors import DataPrepError
    from data_prep.source import DEFAULT_REVISION, Selection, open_source

    try:
        selection = Selection(splits=tuple(split), chunks=tuple(chunk), fraction=fraction, seed=seed,
                              **({"globs": tuple(glob)} if glob else {}))
        summary = download(open_source(source, revision or DEFAULT_REVISION), out, selection, workers=workers,
                           verify_existing=verify_existing, progress=progress)
    except DataPrepError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{summary.selected} files selected: downloaded {summary.downloaded}, already verified "
               f"{summary.skipped}, adopted {summary.adopted}; {summary.bytes_received / 2**20:.1f} MiB in "
               f"{summary.seconds:.1f} s; manifest {summary.manifest}")


@data_app.command("tokenize")
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

    from data_prep.errors import DataPrepError
    from data_prep.tokenize import TokenizeConfig, tokenize

    try:
        config = TokenizeConfig(workers=workers, shard_tokens=shard_tokens, progress=progress,
                                max_bad_line_fraction=max_bad_line_fraction,
                                max_quarantined_fraction=max_quarantined_fraction)
        summary = tokenize(src, out, config)
    except (DataPrepError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary.to_json(), fh, indent=1)
    typer.echo(summary.to_markdown())
    typer.echo("manifests: " + ", ".join(f"{k}={v}" for k, v in summary.manifests.items()))


@data_app.command("sample")
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
    from data_prep.errors import DataPrepError
    from data_prep.sample import SampleSpec, build_sample

    try:
        spec = SampleSpec(megabytes=megabytes, train_chunks=train_chunks,
                          train_files_per_chunk=train_files_per_chunk, validation_chunks=validation_chunks,
                          validation_files_per_chunk=validation_files_per_chunk, seed=seed)
        result = build_sample(out, spec)
    except DataPrepError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    totals = result.totals
    verb = "already complete" if result.skipped else "built"
    typer.echo(f"{result.out}: {verb}; {totals['files']} files, {totals['documents']} documents, "
               f"{totals['text_bytes'] / 1e6:.2f} MB of text ({totals['compressed_bytes'] / 1e6:.2f} MB compressed); "
               f"manifest {result.out / 'manifest.json'}")


def main() -> None:  # pragma: no cover - console entry for `python -m rwkv5.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
