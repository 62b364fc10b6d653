"""How a daemon finds the workers that outlived its predecessor. Stdlib only.

Each worker writes a record, ``MSERVE_HOME/workers/NAME.json`` (0600), as soon as it starts
and again once it serves: its pid, the kernel's start time of that pid (so a recycled pid is
never mistaken for it), its private control socket and the secret a daemon must present
there. A starting daemon reads the records, checks each against SQLite and adopts or replaces
the worker. The worker removes its record when it exits cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path

from mserve.daemon.paths import MAX_SOCKET_PATH, Paths, ensure_private_dir

RECORDS = "workers"


def folder(paths: Paths) -> Path:
    return paths.home / RECORDS


def record_path(paths: Paths, name: str, replica: int = 0) -> Path:
    """``NAME.json``, and ``NAME@I.json`` for process I > 0 of a deployment with several
    (``@`` is not allowed in names, so no deployment's record is another's)."""
    return folder(paths) / (f"{name}.json" if not replica else f"{name}@{replica}.json")


def split_stem(stem: str) -> tuple[str, int]:
    """A record's file stem as (deployment, process index)."""
    name, _, index = stem.partition("@")
    return name, int(index) if index.isdigit() else 0


def socket_path(paths: Paths, name: str, replica: int = 0, kind: str = "w") -> Path:
    """A worker's private socket (``kind`` w: its control socket, p: where its sibling
    processes ask it for its figures, h: where it takes a dead sibling's connections): next
    to the daemon's when that fits a socket address, else in a private folder under /tmp
    named after the home."""
    short = f"{kind}-" + hashlib.sha256(name.encode()).hexdigest()[:12] + \
        (f"-{replica}" if replica else "") + ".sock"
    wanted = paths.socket.parent / short
    if len(os.fsencode(wanted)) <= MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(os.fsencode(paths.home)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mserve-{os.getuid()}-{digest}-w" / short


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where there is no
    /proc or no such running process (a zombie has exited). With the pid it names one process
    for the life of the boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # exited, not yet reaped: gone
        return None
    return fields[19]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie (exited, its parent has not reaped it yet:
    a container's init or a supervisor script may take seconds) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it runs
        return True
    return start_time(pid) is not None or not os.path.exists("/proc/self/stat")


def write(path: Path, record: dict) -> None:
    """Write ``record`` atomically (temp file, fsync, rename), 0600."""
    ensure_private_dir(path.parent)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def remove(path: Path, pid: int) -> None:
    """Remove the record at ``path`` if it is still the one of ``pid``."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def read_all(paths: Paths) -> dict[str, dict[int, dict]]:
    """Every worker record, by deployment name and process index; unreadable ones are
    skipped."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(folder(paths).glob("*.json")) if folder(paths).is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if isinstance(record, dict) and isinstance(record.get("pid"), int):
                name, index = split_stem(path.stem)
                found.setdefault(name, {})[index] = {**record, "path": str(path)}
    return found


def alive(record: dict) -> bool:
    """Whether the process the record names still runs (same pid, same start time)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = start_time(pid)
    if now is None:  # no /proc (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return record.get("started") is None
    return now == record.get("started")


def signal_worker(record: dict, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to the recorded worker if it is still that process; whether it was."""
    if not alive(record):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(record["pid"], sig)
        return True
    return False
