"""``santa daemon start|stop|status``: the per-user daemon that keeps a model loaded behind a
private Unix socket, so ``santa complete``/``infill`` answer without importing torch (see
:mod:`santacli.daemon`). ``santa daemon run`` is the daemon itself, in the foreground."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from santacli.cli.options import CommonOptions, load_model, with_common_options
from santacli.cli.output import err, state
from santacli.settings import load_settings

# Commands are registered in cli/app.py with the root flags.
app = typer.Typer(help="Keep a model loaded in a per-user background server (a private Unix socket).",
                  no_args_is_help=True)

IdleMinutes = Annotated[Optional[float], typer.Option(  # noqa: UP045
    "--idle-minutes", help="Exit after this long without requests [default: config daemon_idle_minutes, 30].")]


@with_common_options(files=False, remote=False)
def start(common: CommonOptions, idle_minutes: IdleMinutes = None) -> None:
    """Start the daemon with a model (the configured one by default) unless one is running."""
    from santacli import daemon

    settings = load_settings()
    spec = common.model_spec(settings)
    running = daemon.status()
    if running is not None:
        err.print(f"santa: a daemon is already running with {running.get('model')} (pid {running.get('pid')})",
                  soft_wrap=True)
        return
    idle = settings.daemon_idle_minutes if idle_minutes is None else idle_minutes
    if err.is_terminal and not state.quiet:
        with err.status(f"Starting the santa daemon with {spec.model}…", spinner="dots"):
            health = daemon.start(spec, idle_minutes=idle)
    else:
        health = daemon.start(spec, idle_minutes=idle)
    err.print(f"santa: daemon running with {health.get('model')} (pid {health.get('pid')}) at "
              f"{daemon.socket_path()}", soft_wrap=True)


def stop() -> None:
    """Stop the running daemon."""
    from santacli import daemon

    pid = daemon.stop()
    err.print("santa: no daemon is running" if pid is None else f"santa: stopped the daemon (pid {pid})")


def status(json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Say whether a daemon runs, with which model; exit 1 when none does."""
    from santacli import daemon

    health = daemon.status()
    if json_out:
        sys.stdout.write(json.dumps(health or {"status": "stopped"}) + "\n")
    elif health is None:
        sys.stdout.write("stopped\n")
    else:
        spec = health.get("spec")
        details = spec.items() if isinstance(spec, dict) else ()
        sys.stdout.write(f"running  pid {health.get('pid')}  model {health.get('model')}  "
                         f"idle {health.get('idle_s')} s  socket {daemon.socket_path()}\n"
                         + "".join(f"  {k}: {v}\n" for k, v in details if v and k != "model"))
    if health is None:
        raise typer.Exit(1)


@with_common_options(files=False, remote=False)
def run(common: CommonOptions, idle_minutes: IdleMinutes = None) -> None:
    """Be the daemon, in the foreground (what ``start`` runs in the background)."""
    from santacli.server.daemon import serve_daemon

    settings = load_settings()
    serve_daemon(load_model, common.model_spec(settings),
                 idle_minutes=settings.daemon_idle_minutes if idle_minutes is None else idle_minutes)
