"""The ``cnnkit`` command: registers the verbs and turns errors into one-line messages.

User errors (``CnnkitError``, bad options) print one line and exit with code 2; anything else is a
bug: one line plus a hint to rerun with ``--debug`` for the traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys

import click
import typer

from cnnkit.cli import bench as bench_cmd
from cnnkit.cli import common
from cnnkit.cli import doctor as doctor_cmd
from cnnkit.cli import eval as eval_cmd
from cnnkit.cli import explain as explain_cmd
from cnnkit.cli import export as export_cmd
from cnnkit.cli import lr_find as lr_find_cmd
from cnnkit.cli import models as models_cmd
from cnnkit.cli import predict as predict_cmd
from cnnkit.cli import report as report_cmd
from cnnkit.cli import runs as runs_cmd
from cnnkit.cli import serve as serve_cmd
from cnnkit.cli import shard as shard_cmd
from cnnkit.cli import train as train_cmd
from cnnkit.cli import tune as tune_cmd

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
app.command("shard")(shard_cmd.shard)
app.command("doctor")(doctor_cmd.doctor)
app.command("report")(report_cmd.report)
app.command("explain")(explain_cmd.explain)
app.command("lr-find")(lr_find_cmd.lr_find)
app.command("export")(export_cmd.export)
app.command("bench")(bench_cmd.bench)
app.command("serve")(serve_cmd.serve)
app.command("tune")(tune_cmd.tune)
app.command("runs")(runs_cmd.runs)
app.command("compare")(runs_cmd.compare_)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (and exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    code = run(argv)
    if code:
        sys.exit(code)
    return 0


def _typer_errors() -> tuple[tuple, tuple, tuple]:
    """(exit, usage error, abort) exception classes: click's and, since Typer 0.25 vendors its
    own copy of click, Typer's."""
    exits, usage, aborts = [click.exceptions.Exit], [click.ClickException], [click.Abort]
    exits.append(getattr(typer, "Exit", click.exceptions.Exit))
    aborts.append(getattr(typer, "Abort", click.Abort))
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        usage.append(TyperClickException)
    except ImportError:
        pass
    return tuple(set(exits)), tuple(set(usage)), tuple(set(aborts))


EXIT_ERRORS, USAGE_ERRORS, ABORT_ERRORS = _typer_errors()


def run(argv: list[str]) -> int:
    from cnnkit.errors import CnnkitError

    debug = "--debug" in argv
    if argv[:1] == ["--debug"]:  # also accepted before the verb
        argv = argv[1:]
    common.CURRENT_ARGV[:] = argv
    try:
        code = app(args=argv, prog_name="cnnkit", standalone_mode=False)
    except EXIT_ERRORS as e:
        return e.exit_code
    except USAGE_ERRORS as e:
        e.show()
        return 2
    except (KeyboardInterrupt, *ABORT_ERRORS):
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
    return code if isinstance(code, int) else 0  # typer.Exit(n) comes back as n


def one_line(error: BaseException) -> str:
    """The useful line of an error; DataLoader workers wrap the original in a traceback dump."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1] if len(lines) > 1 else lines[0]
    return last.split("CnnkitError: ", 1)[-1].strip()


if __name__ == "__main__":
    main()
