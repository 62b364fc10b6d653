from __future__ import annotations

import time
from typing import Annotated

import typer

from mserve.cli import autostart
from mserve.cli.client import DaemonClient, DaemonUnavailable
from mserve.cli.commands.logs import daemon_log
from mserve.cli.render import JsonOption, duration, emit_json, say
from mserve.daemon import envnumbers
from mserve.daemon import paths as paths_mod
from mserve.daemon import workerrecord
from mserve.daemon.errors import MserveError

app = typer.Typer(help="Start, stop and inspect the background daemon.", no_args_is_help=True)


def _client() -> tuple[paths_mod.Paths, DaemonClient]:
    paths = paths_mod.resolve()
    return paths, DaemonClient(str(paths.socket), timeout=autostart.start_timeout())


@app.command()
def start(
    restore_backup: Annotated[bool, typer.Option(
        "--restore-backup", help="First put back the newest good automatic backup of state.db "
                                 "(the files it replaces are kept aside).")] = False,
    json_out: JsonOption = False,
) -> None:
    """Start the daemon in the background; returns once it answers (no-op if running).

    Example: mserve daemon start
    """
    paths, c = _client()
    restored = None
    try:
        pid, started = c.status()["pid"], False
    except DaemonUnavailable:
        if restore_backup:
            restored = _restore(paths, quiet=json_out)
        pid, started = autostart.start(paths), True
    else:
        if restore_backup:
            raise MserveError(f"the daemon is running (pid {pid}); stop it first with "
                              "'mserve daemon stop'")
    if json_out:
        emit_json({"running": True, "pid": pid, "started": started, "socket": str(paths.socket),
                   **({"restored": restored} if restored else {})})
    else:
        say(f"Daemon {'started' if started else 'already running'} (pid {pid})")


def _restore(paths: paths_mod.Paths, quiet: bool) -> dict:
    from mserve.daemon import backup

    restored = backup.restore(paths.home, paths.db)
    if not quiet:
        kept = f"; the files it replaced are in {restored['replaced']}" \
            if restored["replaced"] else ""
        held = restored["deployments"]
        say(f"Restored {paths.db} from the backup taken at {restored['taken']} "
            f"({held} deployment{'' if held == 1 else 's'}){kept}")
        if n := len(restored["unreferenced"]):
            say(f"{n} model{'s' if n != 1 else ''} in the store {'is' if n == 1 else 'are'} "
                "not in this backup (deployed after it): kept, but 'mserve prune' would "
                "delete them; deploy again what you need")
    return restored


@app.command()
def stop(
    keep_serving: Annotated[bool, typer.Option(
        "--keep-serving", help="Leave the workers serving; the next daemon adopts them.")]
    = False,
    json_out: JsonOption = False,
) -> None:
    """Drain in-flight requests, stop every worker, and exit (with --keep-serving: exit and
    leave every deployment serving, e.g. to upgrade mserve or hand over to a service).

    Example: mserve daemon stop --keep-serving
    """
    paths, c = _client()
    try:
        pid = c.shutdown(keep_serving)["pid"]
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
    deadline = time.monotonic() + envnumbers.drain_timeout() + 15
    while time.monotonic() < deadline:
        if not workerrecord.running(pid):  # a zombie has exited: its parent may reap it late
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
    json_out: JsonOption = False,
) -> None:
    """Print the daemon's log (the same as `mserve logs` without a name).

    Example: mserve daemon logs -n 100
    """
    daemon_log(paths_mod.resolve().daemon_log, lines, follow, json_out)


@app.command()
def install(
    print_only: Annotated[bool, typer.Option("--print", help="Print the unit; write nothing.")]
    = False,
    json_out: JsonOption = False,
) -> None:
    """Write a service-manager unit (systemd user unit; launchd agent on macOS) that runs the
    daemon and restarts it when it fails. Workers keep serving while it restarts.

    Example: mserve daemon install && systemctl --user enable --now mserve
    """
    from mserve.cli import service

    paths, kind = paths_mod.resolve(), service.manager()
    path, text = service.unit_path(kind, paths), service.render(kind, paths)
    if print_only:
        typer.echo(text, nl=False)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise MserveError(f"cannot write '{path}': {exc.strerror or exc}") from None
    steps = service.next_steps(kind, path, paths)
    if json_out:
        emit_json({"manager": kind, "path": str(path), "home": str(paths.home), "next": steps})
        return
    say(f"Wrote {path} ({kind}). To start it now and at login:")
    for step in steps:
        say(f"  {step}")
    say("A daemon started by hand still runs? Stop it first with "
        "'mserve daemon stop --keep-serving': the service's daemon adopts its workers.")
