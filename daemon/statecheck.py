"""Is ``state.db`` what the daemon last wrote? Checked at every start, before anything
trusts it, and again before ``prune`` deletes a model.

Left alone, SQLite turns damage into an empty or older state without a word: it creates
fresh tables in a 0-byte file, and it replays a write-ahead log only up to its first bad
frame, then checkpoints and deletes the log. A daemon started on that serves nothing, and a
later ``mserve prune`` deletes every model the lost rows referred to. So the daemon first
checks the files themselves (size, header, the log's frames), then the contents through a
read-only connection (``PRAGMA quick_check``, its tables), takes a backup (``backup.py``)
and only then opens the database for writing. Damage stops the start with one line that
names the file and the command that recovers it; the files are left as they were.

When the disk is full the state is opened read-only (see ``State``): the deployments it
holds are restored and served, every change is refused with a clear message.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import struct
from pathlib import Path

from mserve.daemon import backup
from mserve.daemon.errors import MserveError
from mserve.daemon.state import State, StateWriteError

log = logging.getLogger("mserve.daemon")
HEADER = b"SQLite format 3\x00"
TABLES = {"migrations", "deployments", "versions", "events"}
PROBE_BYTES = 64 * 1024  # about what SQLite needs to open and write: its -shm and a few frames
WAL_HEADER, FRAME_HEADER = 32, 24
WAL_BYTE_ORDER = {0x377F0682: "<", 0x377F0683: ">"}  # of the checksums, from the magic
DISK_ERRORS = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_READONLY",
               "SQLITE_PERM")
DISK_MESSAGES = ("disk I/O error", "disk is full", "unable to open", "readonly database")
DAMAGE_ERRORS = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
DAMAGE_MESSAGES = ("malformed", "not a database")


EXIT_STATE_DAMAGED = 78  # sysexits' EX_CONFIG: do not restart, a person must act


class StateDamaged(MserveError):
    status = 409


def open_state(home: Path, db: Path, store: Path) -> State:
    """The daemon's state: checked, backed up, open for writing, or read-only when the
    disk is full. Raises ``StateDamaged`` (and leaves every file alone) on damage."""
    check_files(db, store)
    checked = db.exists() and _check_and_back_up(home, db, store)
    problem = write_problem(home, db)
    if problem is None:
        try:
            return State(db)
        except sqlite3.DatabaseError as exc:
            if _is(exc, DAMAGE_ERRORS, DAMAGE_MESSAGES):
                raise damaged(db, store, f"SQLite says '{exc}'") from None
            if not _is(exc, DISK_ERRORS, DISK_MESSAGES):
                raise MserveError(f"cannot open {db}: {exc}") from None
            problem = f"cannot write {db} ({exc})"
    if not db.exists():
        raise MserveError(f"{problem}: cannot create {db}; free some space and start again")
    log.warning("%s: opening %s read-only; its deployments are served, changes are refused "
                "until the daemon restarts with space to write", problem, db)
    try:
        state = State(db, read_only=problem)
    except StateWriteError:
        raise  # a migration it cannot run: says so
    except sqlite3.Error as exc:
        raise MserveError(f"{problem}, and {db} cannot be read either ({exc})") from None
    if not checked:
        try:
            check_contents(state.db.conn, db, store)
        except BaseException:
            state.close()
            raise
    return state


def check_files(db: Path, store: Path) -> None:
    """What can be told before SQLite opens the file (opening it may change it)."""
    models = stored_models(store)
    wal = db.with_name(db.name + "-wal")
    if not db.exists():
        if models:
            latest = next(iter(backup.backups(db.parent)), None)
            log.warning("no %s: starting with no deployments; the %d models in %s stay (prune "
                        "keeps them while the state records nothing)%s", db, len(models), store,
                        f"; to go back to the backup taken at {latest.when}: 'mserve daemon "
                        "stop', then 'mserve daemon start --restore-backup'" if latest else "")
        return
    if db.stat().st_size == 0:
        if models or _size(wal):
            raise damaged(db, store, f"it is empty (0 bytes) while the model store holds "
                                     f"{count(len(models), 'model')}")
        return  # a first start that was stopped before its first write
    with open(db, "rb") as f:
        if f.read(len(HEADER)) != HEADER:
            raise damaged(db, store, "it is not a SQLite database")
    if why := wal_problem(wal):
        raise damaged(db, store, why)


def check_contents(conn: sqlite3.Connection, db: Path, store: Path) -> None:
    """Integrity and tables, through ``conn`` (read-only: nothing is written)."""
    problem = integrity(conn)
    if problem != "ok":
        raise damaged(db, store, f"it fails SQLite's integrity check ({problem})")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    models = stored_models(store)
    if "migrations" not in tables:
        if models:
            raise damaged(db, store, f"it has lost its tables while the model store holds "
                                     f"{count(len(models), 'model')}")
        return  # a new database
    if missing := sorted(TABLES - tables):
        raise damaged(db, store, f"it has lost its {', '.join(missing)} table")
    if models and blank(conn):
        log.warning("%s records no version and no event while %s holds %d models: prune "
                    "will refuse to run", db, store, len(models))


def integrity(conn: sqlite3.Connection) -> str:
    """'ok', or SQLite's first complaint."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    return rows[0][0] if len(rows) == 1 else f"{rows[0][0]} and {len(rows) - 1} more"


def blank(conn: sqlite3.Connection) -> bool:
    """No version and no event: this state never recorded a deploy, or lost everything."""
    return all(conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {t})").fetchone()[0]
               for t in ("versions", "events"))


def prune_refusal(state: State, store: Path) -> str | None:
    """Why ``prune`` must not delete anything (the state looks damaged), or None."""
    models = stored_models(store)
    if not models:
        return None
    try:
        problem, empty = integrity(state.db.conn), blank(state.db.conn)
    except sqlite3.Error as exc:
        problem, empty = str(exc), False
    if problem != "ok":
        why = f"{state.path} fails SQLite's integrity check ({problem})"
    elif empty:
        why = (f"{state.path} records no version and no event, yet the model store holds "
               f"{count(len(models), 'model')}")
    else:
        return None
    return (f"refusing to prune: {why}; the state looks damaged or was replaced, so no model "
            f"was deleted. Restore a backup ('mserve daemon stop', then 'mserve daemon start "
            f"--restore-backup'), or delete unwanted models from {store} yourself")


def wal_problem(wal: Path) -> str | None:
    """Why the write-ahead log is damaged, or None (no log, or one SQLite reads in full).

    A log ends at its first frame whose salts or checksum do not match; that is normal
    after a crash (the frames of a transaction that never committed). But a later frame of
    the same log (same salts) that commits means the bad frame was damaged afterwards, and
    SQLite would drop every change committed from there on."""
    try:
        f = open(wal, "rb")
    except FileNotFoundError:
        return None
    with f:
        head = f.read(WAL_HEADER)
        if len(head) < WAL_HEADER:
            return None  # no frame: nothing committed can be lost
        magic, version, page, _, salt1, salt2, c1, c2 = struct.unpack(">8I", head)
        order = WAL_BYTE_ORDER.get(magic)
        if (order is None or version != 3007000 or page < 512 or page > 65536
                or page & (page - 1) or _checksum(head[:24], order, (0, 0)) != (c1, c2)):
            if _size(wal) < WAL_HEADER + FRAME_HEADER + 512:
                return None
            return f"its write-ahead log {wal.name} has a damaged header"
        sums, number = (c1, c2), 0
        while len(frame := f.read(FRAME_HEADER + page)) == FRAME_HEADER + page:
            number += 1
            _, _, s1, s2, k1, k2 = struct.unpack(">6I", frame[:FRAME_HEADER])
            if (s1, s2) == (salt1, salt2):
                sums = _checksum(frame[:8] + frame[FRAME_HEADER:], order, sums)
                if sums == (k1, k2):
                    continue
            if _commits_later(f, page, (salt1, salt2)):
                return (f"frame {number} of its write-ahead log {wal.name} is damaged; "
                        "changes committed after it would be lost")
            return None
    return None


def _commits_later(f, page: int, salts: tuple[int, int]) -> bool:
    while len(frame := f.read(FRAME_HEADER + page)) == FRAME_HEADER + page:
        _, commit, s1, s2 = struct.unpack(">4I", frame[:16])
        if commit and (s1, s2) == salts:
            return True
    return False


def _checksum(data: bytes, order: str, sums: tuple[int, int]) -> tuple[int, int]:
    """SQLite's WAL checksum (walChecksumBytes): over pairs of 32-bit words."""
    s1, s2 = sums
    words = iter(struct.unpack(f"{order}{len(data) // 4}I", data))
    for x0, x1 in zip(words, words):
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2


def write_problem(home: Path, db: Path) -> str | None:
    """Why the daemon cannot write its state (a full disk, a read-only file), or None.
    Found by writing a small file, since SQLite only says 'disk I/O error'."""
    if db.exists() and not os.access(db, os.W_OK):
        return f"{db} is not writable"
    for stale in home.glob(".write-probe-*"):  # a daemon killed while probing
        _remove([stale])
    probe = home / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(PROBE_BYTES))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"the disk is full ({exc.strerror}: {home})"
        return f"cannot write to {home} ({exc.strerror})"
    finally:
        _remove([probe])
    return None


def damaged(db: Path, store: Path, why: str) -> StateDamaged:
    """The one-line refusal: what is wrong, that nothing changed, and how to recover."""
    latest = next(iter(backup.backups(db.parent)), None)
    if latest is not None:
        held = latest.deployments()
        fix = (f"to go back to the backup taken at {latest.when} ("
               f"{'?' if held is None else count(held, 'deployment')}), run 'mserve daemon "
               "start --restore-backup' (the damaged files are kept aside)")
    else:
        fix = (f"there is no backup: to start with no deployments, move {db.name} and its "
               f"-wal and -shm files out of {db.parent}")
    return StateDamaged(f"{db} is damaged: {why}. The daemon did not start and changed "
                        f"nothing (the models in {store} are kept); {fix}")


def count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def stored_models(store: Path) -> list[str]:
    try:
        return sorted(e.name for e in store.iterdir() if not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _check_and_back_up(home: Path, db: Path, store: Path) -> bool:
    """Check the contents read-only and back them up; False when SQLite cannot open the
    file even to read (a full disk: the read-only state is checked once opened)."""
    created = [p for p in (db.with_name(db.name + s) for s in ("-wal", "-shm"))
               if not p.exists()]
    try:
        conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
        try:
            check_contents(conn, db, store)
            if "migrations" in {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}:
                backup.take(conn, home)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if _is(exc, DISK_ERRORS, DISK_MESSAGES):
            return False
        _remove(created)
        if _is(exc, DAMAGE_ERRORS, DAMAGE_MESSAGES):
            raise damaged(db, store, f"SQLite says '{exc}'") from None
        raise MserveError(f"cannot read {db}: {exc}") from None
    except StateDamaged:
        _remove(created)  # the empty log and index this connection made: as it was before
        raise
    return True


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:  # gone already, or not ours to remove: leave it
            pass


def _is(exc: sqlite3.Error, names: tuple[str, ...], messages: tuple[str, ...]) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name:
        return name.startswith(names)
    return any(m in str(exc) for m in messages)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_only_guard(app, state: State):
    """ASGI wrapper: while ``state`` is read-only, refuse every change before it reaches a
    worker (reads, prune, copying an artifact out and shutdown still work)."""
    from starlette.responses import JSONResponse

    async def guarded(scope, receive, send):
        if (state.read_only and scope["type"] == "http"
                and scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
                and scope["path"] not in ("/v1/prune", "/v1/shutdown")
                and not scope["path"].endswith("/copy")):
            answer = JSONResponse({"error": state.refusal()}, status_code=507)
            return await answer(scope, receive, send)
        return await app(scope, receive, send)

    return guarded
