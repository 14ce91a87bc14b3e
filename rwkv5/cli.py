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


def main() -> None:  # pragma: no cover - console entry for `python -m rwkv5.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
