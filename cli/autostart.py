"""Check, then start, then explain: reach the daemon, starting it when it is not running."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mserve.cli.client import DaemonClient, DaemonUnavailable
from mserve.daemon import envnumbers
from mserve.daemon import paths as paths_mod
from mserve.daemon import workerrecord
from mserve.daemon.errors import MserveError

START_TIMEOUT_S = 60.0  # MSERVE_START_TIMEOUT


def start_timeout() -> float:
    return envnumbers.number("MSERVE_START_TIMEOUT", START_TIMEOUT_S)
EXIT_ALREADY_RUNNING = 3


def client(autostart: bool = True) -> DaemonClient:
    """A client of the daemon that starts it, on first need, when it is not running (unless
    ``MSERVE_NO_AUTOSTART=1``). No probe first: a running daemon costs one round trip."""
    paths = paths_mod.resolve()

    def start_it() -> None:
        if not autostart or os.environ.get("MSERVE_NO_AUTOSTART") == "1":
            raise MserveError("the mserve daemon is not running",
                              hint=f"start it with 'mserve daemon start' "
                                   f"(log: {paths.daemon_log})")
        start(paths)

    return DaemonClient(str(paths.socket), on_not_running=start_it)


def start(paths: paths_mod.Paths) -> int:
    """Start the daemon in the background and wait until it answers; its pid. A folder
    another user could control is refused here, before any daemon starts."""
    limit = start_timeout()  # a bad value refused before any daemon starts
    for folder in (paths.home, paths.logs, paths.socket.parent):
        paths_mod.ensure_private_dir(folder)
    with open(paths.daemon_log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mserve.daemon"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    c = DaemonClient(str(paths.socket))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            return c.status(timeout=max(0.1, deadline - time.monotonic()))["pid"]
        except DaemonUnavailable:
            pass
        code = proc.poll()
        # Exit 3: another daemon (a worker may have started one) holds the lock; wait for
        # it only while it lives.
        if code is not None and (code != EXIT_ALREADY_RUNNING or not _holder_alive(paths)):
            raise MserveError(f"the daemon failed to start: {_last_line(paths.daemon_log)}",
                              hint=f"see the log: {paths.daemon_log}")
        time.sleep(0.05)
    raise MserveError(f"the daemon did not answer within {limit:.0f} s",
                      hint=f"see the log: {paths.daemon_log}")


def _holder_alive(paths: paths_mod.Paths) -> bool:
    """Whether the process named in the daemon's lock file runs (0.5 s of grace for the
    one that holds the lock to write its pid)."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            pid = int(paths.lock.read_text().strip() or "0")
            if pid > 0 and workerrecord.running(pid):
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _last_line(path) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    return lines[-1].removeprefix("Error: ") if lines else "no log"
