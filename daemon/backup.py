"""Automatic backups of ``state.db`` and the restore that ``--restore-backup`` runs.

At each start, once the database has passed its checks (``statecheck.py``) and before the
daemon writes to it (migrations included), a consistent copy is taken with SQLite's backup
API into ``MSERVE_HOME/backups/state-<UTC time>-<fingerprint>.db``. The fingerprint is a
hash of the deployments and versions, so restarts that change nothing but the event log
replace the newest copy instead of pushing older, different states out; the newest
``KEEP`` distinct states are kept. A restore moves the current files aside (never deletes
them) and puts the newest backup that passes ``PRAGMA quick_check`` in their place.

Stdlib only: the CLI imports this for ``mserve daemon start --restore-backup``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mserve.daemon.errors import Conflict, MserveError
from mserve.daemon.store import fsync_path

log = logging.getLogger("mserve.daemon")
KEEP = 5
FOLDER = "backups"
SUFFIXES = ("", "-wal", "-shm")  # a database and the files SQLite keeps next to it


@dataclass(frozen=True)
class Backup:
    path: Path
    when: str  # e.g. 2026-12-02 04:00:08 UTC
    fingerprint: str

    def deployments(self) -> int | None:
        """How many deployments it holds; None when it cannot be read."""
        try:
            with contextlib.closing(_open_read_only(self.path)) as conn:
                return conn.execute("SELECT COUNT(*) FROM deployments").fetchone()[0]
        except sqlite3.Error:
            return None

    def usable(self) -> bool:
        try:
            with contextlib.closing(_open_read_only(self.path)) as conn:
                return conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        except sqlite3.Error:
            return False


def folder(home: Path) -> Path:
    return home / FOLDER


def backups(home: Path) -> list[Backup]:
    """The backups of ``home``'s state, newest first."""
    found = []
    for path in folder(home).glob("state-*.db"):
        parts = path.stem.split("-")
        if len(parts) != 3:
            continue
        try:
            stamp = time.strptime(parts[1], "%Y%m%dT%H%M%SZ")
        except ValueError:
            continue
        found.append(Backup(path, time.strftime("%Y-%m-%d %H:%M:%S UTC", stamp), parts[2]))
    return sorted(found, key=lambda b: b.path.name, reverse=True)


def fingerprint(conn: sqlite3.Connection) -> str:
    """A short hash of what a restore brings back: every deployment and version row."""
    digest = hashlib.sha256()
    for table in ("deployments", "versions"):
        for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2"):
            digest.update(repr(row).encode())
    return digest.hexdigest()[:12]


def take(conn: sqlite3.Connection, home: Path, keep: int = KEEP) -> Path | None:
    """Copy the database behind ``conn`` into the backups folder; its path, or None when it
    could not be written (a full disk must not stop the daemon: it is logged)."""
    target = folder(home)
    tmp = target / f".state-{os.getpid()}.tmp"
    try:
        fp = fingerprint(conn)
        target.mkdir(mode=0o700, exist_ok=True)
        newest = backups(home)
        if newest and newest[0].fingerprint == fp:  # the same deployments and versions
            return newest[0].path
        with contextlib.closing(sqlite3.connect(tmp)) as copy:
            conn.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        fsync_path(tmp)
        final = target / f"state-{_stamp()}-{fp}.db"
        os.replace(tmp, final)
        fsync_path(target)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("could not back up state.db into %s: %s", target, exc)
        return None
    _rotate(home, final, keep)
    return final


def _rotate(home: Path, newest: Path, keep: int) -> None:
    """Keep the newest copy of each of the ``keep`` newest distinct states."""
    seen: set[str] = set()
    for b in backups(home):
        if b.fingerprint in seen or len(seen) >= keep:
            if b.path != newest:
                with contextlib.suppress(OSError):
                    b.path.unlink()
            continue
        seen.add(b.fingerprint)


def restore(home: Path, db: Path) -> dict:
    """Put the newest usable backup in place of ``db`` (the daemon must not be running);
    the current files are moved into ``backups/replaced-<time>/``."""
    with _daemon_lock(home):
        chosen = next((b for b in backups(home) if b.usable()), None)
        if chosen is None:
            raise MserveError(f"no usable backup of {db} in {folder(home)}",
                              hint="move state.db and its -wal/-shm files out of "
                                   f"{home} to start with no deployments")
        aside = folder(home) / f"replaced-{_stamp()}"
        moved = []
        for suffix in SUFFIXES:
            current = db.with_name(db.name + suffix)
            if current.exists():
                aside.mkdir(parents=True, exist_ok=True)
                os.replace(current, aside / current.name)
                moved.append(current.name)
        tmp = db.with_name(f".{db.name}.restoring")
        shutil.copyfile(chosen.path, tmp)
        fsync_path(tmp)
        os.replace(tmp, db)
        fsync_path(db.parent)
    return {"backup": str(chosen.path), "taken": chosen.when,
            "deployments": chosen.deployments(), "replaced": str(aside) if moved else None,
            "unreferenced": _unreferenced(db, home / "models")}


def _unreferenced(db: Path, store: Path) -> list[str]:
    """Models in the store that the restored state does not know (deployed after the
    backup was taken): kept, but ``prune`` would delete them."""
    try:
        with contextlib.closing(_open_read_only(db)) as conn:
            known = {r[0] for r in conn.execute(
                "SELECT DISTINCT sha256 FROM versions WHERE state != 'pruned'")}
        return sorted(e.name for e in store.iterdir()
                      if not e.name.startswith(".") and e.name not in known)
    except (OSError, sqlite3.Error):
        return []


@contextlib.contextmanager
def _daemon_lock(home: Path):
    """The daemon's own lock (see main.take_lock): held, no daemon can start meanwhile."""
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode().strip() or "?"
            raise Conflict(f"the daemon is running (pid {pid}); stop it first with "
                           "'mserve daemon stop'") from None
        yield
    finally:
        os.close(fd)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)


