"""The daemon process: take the lock, bind the socket, restore deployments, serve the
control API until told to stop, then drain and stop every worker.

``mserve daemon run`` calls ``run()``; ``mserve daemon start`` runs the same in the
background with its output in ``logs/daemon.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from mserve.daemon import paths as paths_mod
from mserve.daemon.control import build_app
from mserve.daemon.deployments import Deployments
from mserve.daemon.envnumbers import check_daemon_settings, drain_timeout
from mserve.daemon.errors import MserveError
from mserve.daemon.fdlimit import raise_fd_limit
from mserve.daemon.statecheck import open_state, read_only_guard
from mserve.daemon.store import Store

log = logging.getLogger("mserve.daemon")


class AlreadyRunning(MserveError):
    status = 409


class DaemonServer(uvicorn.Server):
    """The daemon owns its signals (uvicorn would re-raise them after serving)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def take_lock(path: Path):
    """Hold an exclusive lock for the daemon's whole life; a second daemon is refused."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"a daemon is already running for this MSERVE_HOME (pid {pid})")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as exc:  # a full disk: the lock holds all the same
        log.warning("could not write the pid into %s: %s", path, exc.strerror)
    return fd


def bind_socket(path: Path) -> socket.socket:
    """Bind the control socket 0600. Called with the lock held, so a socket file that is
    already there is a stale one from a crash and is replaced."""
    if len(os.fsencode(path)) > paths_mod.MAX_SOCKET_PATH:
        raise MserveError(f"socket path '{path}' is too long for a Unix socket; "
                          "use a shorter MSERVE_HOME")
    paths_mod.ensure_private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def run() -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT or ``mserve daemon stop``."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_daemon_settings()
    paths = paths_mod.resolve()
    paths_mod.ensure_private_dir(paths.home)
    paths_mod.ensure_private_dir(paths.logs)
    raise_fd_limit()  # a daemon of many deployments holds many sockets and logs
    lock = take_lock(paths.lock)
    sock = bind_socket(paths.socket)
    try:
        asyncio.run(_serve(paths, sock))
    finally:
        with contextlib.suppress(FileNotFoundError):
            paths.socket.unlink()
        os.close(lock)
    log.info("daemon stopped")
    return 0


async def _serve(paths: paths_mod.Paths, sock: socket.socket) -> None:
    state = open_state(paths.home, paths.db, paths.models)
    store = Store(paths.models)
    if removed := store.clean_partial():
        log.info("removed partial artifacts: %s", ", ".join(removed))
    deployments = Deployments(paths, state, store)
    server: DaemonServer | None = None
    stop_requested = asyncio.Event()
    leave_serving = False

    def stop(keep_serving: bool = False) -> None:
        nonlocal leave_serving
        leave_serving = leave_serving or keep_serving
        stop_requested.set()
        if server is not None:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    log.info("daemon %s starting, home %s", os.getpid(), paths.home)
    await deployments.restore_all()
    app = read_only_guard(build_app(deployments, str(paths.socket), stop), state)
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=drain_timeout() + 5)
    server = DaemonServer(config)
    server.should_exit = stop_requested.is_set()
    log.info("daemon ready on %s", paths.socket)
    try:
        await server.serve(sockets=[sock])
    finally:
        if leave_serving:  # mserve daemon stop --keep-serving: the next daemon adopts them
            log.info("leaving %d workers serving", len(deployments.supervisor.workers))
            await deployments.supervisor.leave_all()
        else:
            log.info("stopping workers")
            await deployments.supervisor.stop_all(drain_timeout())
        state.close()
