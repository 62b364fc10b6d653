from __future__ import annotations

import os
import time
from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.client import DaemonClient, DaemonUnavailable
from mserve.cli.commands.logs import tail_text
from mserve.cli.render import JsonOption, duration, emit_json, say
from mserve.daemon import paths as paths_mod
from mserve.daemon.errors import MserveError

app = typer.Typer(help="Start, stop and inspect the background daemon.", no_args_is_help=True)


def _client() -> tuple[paths_mod.Paths, DaemonClient]:
    paths = paths_mod.resolve()
    return paths, DaemonClient(str(paths.socket), timeout=autostart.START_TIMEOUT_S)


@app.command()
def start(json_out: JsonOption = False) -> None:
    """Start the daemon in the background; returns once it answers (no-op if running).

    Example: mserve daemon start
    """
    paths, c = _client()
    try:
        pid, started = c.status()["pid"], False
    except DaemonUnavailable:
        pid, started = autostart.start(paths), True
    if json_out:
        emit_json({"running": True, "pid": pid, "started": started, "socket": str(paths.socket)})
    else:
        say(f"Daemon {'started' if started else 'already running'} (pid {pid})")


@app.command()
def stop(json_out: JsonOption = False) -> None:
    """Drain in-flight requests, stop every worker, and exit.

    Example: mserve daemon stop
    """
    paths, c = _client()
    try:
        pid = c.shutdown()["pid"]
    except DaemonUnavailable:
        if json_out:
            emit_json({"running": False, "stopped": False})
        else:
            say("Daemon is not running")
        return
    _wait_gone(pid, paths)
    if json_out:
        emit_json({"running": False, "stopped": True, "pid": pid})
    else:
        say(f"Daemon stopped (pid {pid})")


def _wait_gone(pid: int, paths: paths_mod.Paths) -> None:
    deadline = time.monotonic() + float(os.environ.get("MSERVE_DRAIN_TIMEOUT", "30")) + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise MserveError(f"the daemon (pid {pid}) did not exit in time",
                      hint=f"see the log: {paths.daemon_log}")


@app.command()
def status(json_out: JsonOption = False) -> None:
    """Say whether the daemon runs, with its pid, socket, version and uptime.

    Example: mserve daemon status --json
    """
    paths, c = _client()
    try:
        info = c.status()
    except DaemonUnavailable:
        info = {"running": False, "pid": None, "socket": str(paths.socket), "version": None,
                "home": str(paths.home), "log": str(paths.daemon_log)}
    if json_out:
        emit_json(info)
    elif info["running"]:
        say(f"Daemon running (pid {info['pid']}, version {info['version']}, "
            f"up {duration(info['uptime_s'])}, {info['deployments']} deployments)\n"
            f"socket {info['socket']}\nhome   {info['home']}")
    else:
        say(f"Daemon not running (socket {info['socket']})")


@app.command()
def run() -> None:
    """Run the daemon in the foreground (for systemd and containers).

    Example: MSERVE_HOME=/srv/mserve mserve daemon run
    """
    from mserve.daemon.main import run as run_daemon

    raise typer.Exit(run_daemon())


@app.command()
def logs(
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many last lines.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
) -> None:
    """Print the daemon's log (the same as `mserve logs` without a name).

    Example: mserve daemon logs -n 100
    """
    tail_text(paths_mod.resolve().daemon_log, lines, follow)
