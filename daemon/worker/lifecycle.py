"""What a daemon-run worker does for itself, so that it can outlive its daemon: keep its
record (how a later daemon finds it), bound its own start-up in time, rotate its own log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from mserve.daemon import workerrecord
from mserve.daemon.worker import sharedlog

log = logging.getLogger("mserve.worker")
LOG_MAX_BYTES = 16 * 2**20


def log_max_bytes() -> int:
    """``MSERVE_WORKER_LOG_MAX_BYTES``; a bad value is ignored, as for every other knob."""
    try:
        return max(1, int(os.environ["MSERVE_WORKER_LOG_MAX_BYTES"]))
    except (KeyError, ValueError):
        return LOG_MAX_BYTES
LOG_BACKUPS = 3


class Record:
    """This worker's record in ``MSERVE_HOME/workers/`` (see daemon/workerrecord.py)."""

    def __init__(self, config: dict):
        self.path = Path(config["record"])
        self.fields = {"name": config["name"], "pid": os.getpid(),
                       "started": workerrecord.start_time(os.getpid()),
                       "socket": config["control_socket"], "secret": config["secret"],
                       "port": config["port"], "restarts": config.get("restarts", 0),
                       "replica": config.get("replica", 0),
                       "peer_secret": config.get("peer_secret"),
                       "handoff": config.get("handoff_socket"), "ready": False}

    def write(self, ready: bool) -> None:
        try:
            workerrecord.write(self.path, {**self.fields, "ready": ready})
        except OSError as exc:  # a full disk: serve anyway; a later daemon replaces us
            log.warning("could not write the worker record %s: %s", self.path, exc)

    def remove(self) -> None:
        workerrecord.remove(self.path, os.getpid())


class StartDeadline:
    """A worker that is not serving within ``seconds`` exits by itself: its daemon may be
    gone, and nobody else would stop a load that hangs."""

    def __init__(self, seconds: float | None, exit_code: int):
        self._done = threading.Event()
        if seconds:
            threading.Thread(target=self._watch, args=(seconds, exit_code), daemon=True,
                             name="start-deadline").start()

    def _watch(self, seconds: float, exit_code: int) -> None:
        if not self._done.wait(seconds):
            log.error("not serving after %.0f s: giving up (load timeout)", seconds)
            os._exit(exit_code)

    def done(self) -> None:
        self._done.set()


class LogRotation:
    """The worker's log is its stderr (fd 2, where ONNX Runtime writes too): past
    ``max_bytes`` (``MSERVE_WORKER_LOG_MAX_BYTES``, 16 MiB) it becomes ``NAME.log.1`` (older
    ones shift up to ``.3``) and fd 2 is pointed at a fresh file, by whichever of the
    deployment's processes sees it first; the others follow (sharedlog.py)."""

    def __init__(self, path: str | None, max_bytes: int | None = None,
                 backups: int = LOG_BACKUPS):
        self.path, self.backups = path, backups
        self.max_bytes = max_bytes or log_max_bytes()
        self._last = 0.0

    def check(self) -> None:
        """Rotate when the log is too big (at most once a second; cheap otherwise)."""
        now = time.monotonic()
        if not self.path or now - self._last < 1.0:
            return
        self._last = now
        try:
            if os.fstat(2).st_size >= self.max_bytes:  # every process of the deployment
                sharedlog.rotate(self.path, self.max_bytes, self.backups)  # writes here
            if not sharedlog.moved(2, self.path):
                return
            fd = sharedlog.open_append(self.path)
            os.dup2(fd, 2)
            os.dup2(fd, 1)  # stray prints, which the channel sends to stderr's file
            os.close(fd)
        except OSError as exc:
            log.warning("could not rotate %s: %s", self.path, exc)
