"""The ``cnnkit`` command: registers the verbs and turns errors into one-line messages.

User errors (``CnnkitError``, bad options) print one line and exit with code 2; anything else is a
bug: one line plus a hint to rerun with ``--debug`` for the traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys

import click
import typer

from cnnkit.cli import bench as bench_cmd
from cnnkit.cli import eval as eval_cmd
from cnnkit.cli import export as export_cmd
from cnnkit.cli import models as models_cmd
from cnnkit.cli import predict as predict_cmd
from cnnkit.cli import serve as serve_cmd
from cnnkit.cli import train as train_cmd

app = typer.Typer(
    name="cnnkit",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Build, train, evaluate and use convolutional image classifiers.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("predict")(predict_cmd.predict)
app.command("models")(models_cmd.models)
app.command("export")(export_cmd.export)
app.command("bench")(bench_cmd.bench)
app.command("serve")(serve_cmd.serve)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (and exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    code = run(argv)
    if code:
        sys.exit(code)
    return 0


def run(argv: list[str]) -> int:
    from cnnkit.errors import CnnkitError

    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="cnnkit", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("\ninterrupted", file=sys.stderr)
        return 130
    except CnnkitError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the "
            "traceback and please report it)",
            file=sys.stderr,
        )
        return 1
    return 0


def one_line(error: BaseException) -> str:
    """The useful line of an error; DataLoader workers wrap the original in a traceback dump."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1] if len(lines) > 1 else lines[0]
    return last.split("CnnkitError: ", 1)[-1].strip()


if __name__ == "__main__":
    main()
