"""The ``santa`` command line: the Typer app, its root options and commands, and :func:`main`,
the one place where exceptions become one-line messages and exit codes.

SantaError: its ``exit_code``; a usage error from click: 2; Ctrl-C: 130; a closed pipe (``|
head``): 141, silently; anything else: 70, "internal error" (a traceback only with ``--debug``
or ``SANTA_DEBUG=1``). No torch at import time: ``santa --help`` and shell completion stay fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from santacli import __version__
from santacli.cli import complete, daemon, infill, info, lsp, models, repl, serve, setup
from santacli.cli.output import err, state
from santacli.errors import SantaError

app = typer.Typer(
    name="santa",
    help="Code completion and fill-in-the-middle with BigCode's GPTBigCode models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="SANTA_DEBUG",
                                        help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No spinner, stats or hints on stderr.")] = False,
) -> None:
    state.debug, state.quiet = debug, quiet
    if version:
        sys.stdout.write(f"santa {__version__}\n")
        raise typer.Exit()


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No spinner, stats or hints on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


def _with_root_flags(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` also taking ``--quiet`` and ``--debug`` after its name (``santa infill -q``)."""
    params = list(inspect.signature(command, eval_str=True).parameters.values())
    kw = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter("quiet", kw, annotation=Quiet, default=False),
               inspect.Parameter("debug", kw, annotation=Debug, default=False)]

    @functools.wraps(command)
    def run(*, quiet: bool = False, debug: bool = False, **flags: Any) -> None:
        state.quiet, state.debug = state.quiet or quiet, state.debug or debug
        command(**flags)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return run


# The order here is the order of `santa --help`.
for _command in (complete.complete, infill.infill, models.models, models.pull, info.info, serve.serve, repl.repl,
                 lsp.lsp, setup.setup):
    app.command(name=_command.__name__)(_with_root_flags(_command))
for _command in (daemon.start, daemon.stop, daemon.status, daemon.run):
    daemon.app.command(name=_command.__name__, hidden=_command is daemon.run)(_with_root_flags(_command))
app.add_typer(daemon.app, name="daemon")


# ---------------------------------------------------------------------------------------------
# Entry point: the one place where errors become messages and exit codes


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], ...]:
    """(exit, abort, usage/click errors) from typer's bundled click and plain click, if present."""
    exits: list[type[BaseException]] = [typer.Exit]
    aborts: list[type[BaseException]] = [typer.Abort]
    errors: list[type[BaseException]] = [
        next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")]
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        errors.append(click.ClickException)
    except ImportError:  # pragma: no cover - newer typer bundles click
        pass
    return tuple(exits), tuple(aborts), tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run santa; return the exit code (the console script exits with it)."""
    debug = os.environ.get("SANTA_DEBUG", "").lower() in ("1", "true", "yes") or "--debug" in (argv or sys.argv)
    exits, aborts, click_errors = _click_exceptions()
    try:
        # Without standalone mode typer returns an Exit's code (130 for Ctrl-C) instead of exiting.
        code = app(args=argv, prog_name="santa", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        return code if isinstance(code, int) else 0
    except SantaError as exc:
        if debug:
            raise
        err.print(f"santa: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except exits as exc:
        return int(getattr(exc, "exit_code", 0))
    except click_errors as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        err.print(f"santa: error: {message}", markup=False, highlight=False, soft_wrap=True)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("santa: interrupted", markup=False)
        return 130
    except aborts:
        err.print("santa: interrupted", markup=False)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 141
    except Exception as exc:
        if debug:
            raise
        err.print(f"santa: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                  markup=False, highlight=False, soft_wrap=True)
        return 70


def entry() -> None:  # pragma: no cover - the console script
    sys.exit(main())
