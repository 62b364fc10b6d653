"""Log files that every worker process of a deployment appends to (``--workers N``): the
request log and the worker log stay one file per deployment.

Each writer appends whole lines with one ``write`` on an ``O_APPEND`` descriptor, so lines of
different processes never interleave. Any writer may rotate a file that grew past its limit:
under an exclusive lock on ``PATH.lock``, and only if the file is still too big (another
process may have just rotated it). The other writers notice that the path names a new file
(``moved``) and reopen it; what they wrote meanwhile went to ``PATH.1``, as it should.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

MODE = 0o600


def open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, MODE)


def write_all(fd: int, data: bytes) -> None:
    """Append ``data`` (whole lines) with as few writes as the kernel allows (one, unless
    the disk is full or a signal cuts it short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def moved(fd: int, path: str) -> bool:
    """Whether ``path`` no longer names the file ``fd`` writes (another process rotated it)."""
    mine = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    return (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino)


def rotate(path: str, max_bytes: int, backups: int) -> bool:
    """Shift ``path`` to ``path.1`` (``.1`` to ``.2`` ... up to ``backups``) if it has at least
    ``max_bytes``; whether this call rotated it. Safe with several processes at once."""
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, MODE)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_size < max_bytes:
                return False
        except FileNotFoundError:
            return False
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        os.replace(path, f"{path}.1")
        os.close(open_append(path))  # the new file exists before the lock is released
        return True
    finally:
        os.close(lock)  # releases the lock
