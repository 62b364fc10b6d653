"""The daemon's state in SQLite (WAL): deployments, versions and an append-only event log.

Only the daemon writes here, and every change is one transaction, so a crash at any point
leaves either the old or the new state. Rows refer to artifacts only once they are fully in
the store (see ``store.py``).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from mserve.daemon.errors import MserveError

log = logging.getLogger("mserve.daemon")

# Version states: the stable one taking unpinned traffic, one taking a share of it next to
# the active one, the previous active kept loaded for an instant rollback, ones only on disk,
# ones whose artifact was pruned, and ones that never loaded.
ACTIVE, CANARY, STANDBY, RETIRED, PRUNED, FAILED = (
    "active", "canary", "standby", "retired", "pruned", "failed")


def now() -> str:
    """UTC time as ISO 8601 with milliseconds, e.g. 2026-11-29T16:50:00.123Z."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@pid{os.getpid()}"
    except Exception:  # no user name in some containers
        return f"uid{os.getuid()}"


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["deployments"].create({
        "name": str, "port": int, "host": str, "options": str, "token_hash": str,
        "active_version": int, "created": str, "updated": str,
    }, pk="name")
    db["versions"].create({
        "deployment": str, "number": int, "sha256": str, "size": int, "source": str,
        "created": str, "state": str, "error": str, "meta": str,
    }, pk=("deployment", "number"))
    db["events"].create({
        "id": int, "time": str, "deployment": str, "action": str, "version": int,
        "detail": str, "actor": str,
    }, pk="id")
    db["events"].create_index(["deployment", "id"])


def _m002_traffic(db: sqlite_utils.Database) -> None:
    """Traffic split ({version: percent}, NULL = all to the active version) and labels."""
    db["deployments"].add_column("traffic", str)
    db["deployments"].add_column("labels", str)


def _m003_transformer(db: sqlite_utils.Database) -> None:
    """A version's transformer (JSON: script, sha256 of its folder, size, model_sha256; NULL
    for a version without one)."""
    db["versions"].add_column("transformer", str)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
    ("002_traffic", _m002_traffic),
    ("003_transformer", _m003_transformer),
]


class StateWriteError(sqlite3.OperationalError, MserveError):
    """A change SQLite could not record (the state is read-only, the disk is full, the file
    is locked). An ``sqlite3.Error`` for the code that undoes a switch on one, and an error
    whose message the user sees."""

    status = 507


class State:
    """All reads and writes of ``state.db``; one instance per daemon, used from its event loop.

    Every write method is one transaction (``_write``). With ``read_only`` (why it cannot be
    written, e.g. a full disk) the database is only read: it is opened in SQLite's exclusive
    locking mode, which needs no ``-shm`` file, no migration runs, every change raises
    ``StateWriteError`` and events are logged instead of recorded.
    """

    def __init__(self, path: Path, read_only: str | None = None):
        self.path = Path(path)
        self.read_only = read_only
        self.db = sqlite_utils.Database(sqlite3.connect(path))
        try:
            if read_only is None:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute("PRAGMA busy_timeout=5000")
                self._migrate()
                return
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA query_only=ON")
            if pending := self.pending_migrations():
                raise StateWriteError(f"{read_only}: cannot bring {self.path} up to date "
                                      f"({pending[0]}); free some space and start again")
        except BaseException:
            self.db.close()  # a second try (read-only) must not meet this connection
            raise

    def pending_migrations(self) -> list[str]:
        done = set()
        if "migrations" in self.db.table_names():
            done = {row["name"] for row in self.db["migrations"].rows}
        return [name for name, _ in MIGRATIONS if name not in done]

    def _migrate(self) -> None:
        if "migrations" not in self.db.table_names():
            self.db["migrations"].create({"name": str, "applied": str}, pk="name")
        done = {row["name"] for row in self.db["migrations"].rows}
        for name, apply in MIGRATIONS:
            if name not in done:
                with self.db.atomic():
                    apply(self.db)
                    self.db.execute("INSERT INTO migrations (name, applied) VALUES (?, ?)",
                                    [name, now()])

    def close(self) -> None:
        self.db.close()

    def refusal(self) -> str:
        """What a change is told while the state is read-only."""
        return (f"{self.read_only}, so {self.path} is open read-only and cannot record "
                "changes; free some space, then restart the daemon ('mserve daemon stop', "
                "'mserve daemon start')")

    @contextlib.contextmanager
    def _write(self):
        """One transaction; a failure to write it is a ``StateWriteError`` naming the file."""
        if self.read_only:
            raise StateWriteError(self.refusal())
        try:
            with self.db.atomic():
                yield
        except StateWriteError:
            raise
        except sqlite3.OperationalError as exc:
            err = StateWriteError(f"could not record the change in {self.path} ({exc}); "
                                  "nothing was changed")
            if "locked" in str(exc) or "busy" in str(exc):
                err.status = 503  # another writer holds it: try again, not a full disk
            raise err from None

    # ---- reads -------------------------------------------------------------------------
    def _rows(self, sql: str, params: list | tuple = ()) -> list[dict]:
        cursor = self.db.execute(sql, params)
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def deployments(self) -> list[dict]:
        return [_decode(d) for d in self._rows("SELECT * FROM deployments ORDER BY name")]

    def deployment(self, name: str) -> dict | None:
        rows = self._rows("SELECT * FROM deployments WHERE name = ?", [name])
        return _decode(rows[0]) if rows else None

    def versions(self, name: str) -> list[dict]:
        rows = self._rows("SELECT * FROM versions WHERE deployment = ? ORDER BY number", [name])
        return [_decode(v) for v in rows]

    def version(self, name: str, number: int) -> dict | None:
        rows = self._rows("SELECT * FROM versions WHERE deployment = ? AND number = ?",
                          [name, number])
        return _decode(rows[0]) if rows else None

    def next_version(self, name: str) -> int:
        row = self.db.execute("SELECT MAX(number) FROM versions WHERE deployment = ?",
                              [name]).fetchone()
        return (row[0] or 0) + 1

    def events(self, name: str | None = None, limit: int = 100) -> list[dict]:
        if name is None:
            sql, params = "SELECT * FROM events ORDER BY id DESC LIMIT ?", [limit]
        else:
            sql = "SELECT * FROM events WHERE deployment = ? ORDER BY id DESC LIMIT ?"
            params = [name, limit]
        return list(reversed(self._rows(sql, params)))

    # ---- writes (each one transaction) -------------------------------------------------
    def _event(self, name: str, action: str, version: int | None, detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO events (time, deployment, action, version, detail, actor)"
            " VALUES (?, ?, ?, ?, ?, ?)", [now(), name, action, version, detail, _actor()])

    def add_event(self, name: str, action: str, version: int | None = None,
                  detail: str = "") -> bool:
        """Record a bookkeeping event; one that cannot be written (read-only state, full
        disk, a lock held too long) is logged instead, never raised: whatever it records has
        happened already. Whether it was recorded."""
        try:
            with self._write():
                self._event(name, action, version, detail)
            return True
        except StateWriteError as exc:
            log.warning("event %s of %s not recorded: %s", action, name, exc.message)
            return False

    def record_deploy(self, name: str, version: dict, deployment: dict,
                      canary: int | None = None) -> None:
        """Add ``version`` as the active one of ``name`` (creating the deployment if new), or
        with ``canary`` percent as a canary next to the active one."""
        with self._write():
            if self.deployment(name) is None:
                self.db.execute(
                    "INSERT INTO deployments (name, port, host, options, token_hash,"
                    " active_version, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [name, deployment["port"], deployment["host"],
                     json.dumps(deployment["options"]), deployment.get("token_hash"),
                     version["number"], now(), now()])
            else:
                self.db.execute(
                    "UPDATE deployments SET options = ?, token_hash = ?, updated = ?"
                    " WHERE name = ?",
                    [json.dumps(deployment["options"]), deployment.get("token_hash"), now(), name])
            detail = f"sha256 {version['sha256'][:12]} from {version['source']}"
            if pipeline := version.get("transformer"):
                detail += (f", transformer {pipeline['script']} (trusted code, sha256 "
                           f"{pipeline['sha256'][:12]})")
            if canary:
                self._insert_version(name, version, CANARY)
                active = self.deployment(name)["active_version"]
                self._set_traffic(name, {active: 100 - canary, version["number"]: canary})
                self._event(name, "deploy-canary", version["number"], f"{canary}%, {detail}")
            else:
                self._insert_version(name, version, ACTIVE)
                self._switch(name, version["number"])
                self._event(name, "deploy", version["number"], detail)

    def record_failed(self, name: str, version: dict, error: str) -> None:
        """Keep a failed deploy of an existing deployment in its history; nothing else changes."""
        with self._write():
            if self.deployment(name) is not None:
                self._insert_version(name, version, FAILED, error)
            self._event(name, "deploy-failed", version["number"] if self.deployment(name)
                        else None, error)

    def record_activate(self, name: str, number: int, action: str = "rollback") -> None:
        with self._write():
            previous = self.deployment(name)["active_version"]
            self._switch(name, number)
            self._event(name, action, number, f"from version {previous}")

    def record_traffic(self, name: str, traffic: dict[int, int] | None, action: str,
                       detail: str = "") -> None:
        """Set the split of unpinned traffic (None: all to the active version)."""
        with self._write():
            self._set_traffic(name, traffic)
            self._event(name, action, None, detail or split_text(traffic))

    def record_options(self, name: str, options: dict) -> None:
        with self._write():
            self.db.execute("UPDATE deployments SET options = ?, updated = ? WHERE name = ?",
                            [json.dumps(options), now(), name])

    def record_settings(self, name: str, options: dict, token_hash: str | None,
                        detail: str) -> None:
        """A redeploy of the active version's bytes with other options or token."""
        with self._write():
            self.db.execute("UPDATE deployments SET options = ?, token_hash = ?, updated = ? "
                            "WHERE name = ?", [json.dumps(options), token_hash, now(), name])
            self._event(name, "reconfigure", None, detail)

    def record_labels(self, name: str, labels: dict[str, int], detail: str) -> None:
        with self._write():
            self.db.execute("UPDATE deployments SET labels = ?, updated = ? WHERE name = ?",
                            [json.dumps(labels), now(), name])
            self._event(name, "label", None, detail)

    def record_pruned(self, name: str, numbers: list[int]) -> None:
        with self._write():
            for n in numbers:
                self.db.execute("UPDATE versions SET state = ? WHERE deployment = ? AND "
                                "number = ?", [PRUNED, name, n])
            self._event(name, "prune", None, "artifacts of versions "
                        + ", ".join(map(str, numbers)) + " removed")

    def referenced_blobs(self) -> set[str]:
        rows = self.db.execute("SELECT DISTINCT sha256 FROM versions WHERE state != ?",
                               [PRUNED]).fetchall()
        return {r[0] for r in rows}

    def delete_deployment(self, name: str) -> None:
        with self._write():
            self.db.execute("DELETE FROM versions WHERE deployment = ?", [name])
            self.db.execute("DELETE FROM deployments WHERE name = ?", [name])
            self._event(name, "undeploy", None)

    def _insert_version(self, name: str, v: dict, state: str, error: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO versions (deployment, number, sha256, size, source, created, state,"
            " error, meta, transformer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [name, v["number"], v["sha256"], v["size"], v["source"], now(), state, error,
             json.dumps(v.get("meta") or {}),
             json.dumps(v["transformer"]) if v.get("transformer") else None])

    def _set_traffic(self, name: str, traffic: dict[int, int] | None) -> None:
        """Store the split; versions with a share (other than the active one) are canaries,
        canaries without one are retired."""
        active = self.deployment(name)["active_version"]
        sharing = {int(v) for v, w in (traffic or {}).items() if w > 0} - {active}
        self.db.execute("UPDATE versions SET state = ? WHERE deployment = ? AND state = ?",
                        [RETIRED, name, CANARY])
        for v in sharing:
            self.db.execute("UPDATE versions SET state = ? WHERE deployment = ? AND number = ?",
                            [CANARY, name, v])
        stored = json.dumps({str(k): w for k, w in traffic.items()}) if traffic else None
        self.db.execute("UPDATE deployments SET traffic = ?, updated = ? WHERE name = ?",
                        [stored, now(), name])

    def _switch(self, name: str, number: int) -> None:
        """Make ``number`` active with all unpinned traffic, the version active until now
        standby, any other standby or canary retired."""
        current = self.db.execute("SELECT active_version FROM deployments WHERE name = ?",
                                  [name]).fetchone()[0]
        # re-activating the active version keeps its standby (still loaded in the worker)
        retire = (CANARY,) if current == number else (STANDBY, CANARY)
        self.db.execute(f"UPDATE versions SET state = ? WHERE deployment = ? AND state IN "
                        f"({', '.join('?' * len(retire))})", [RETIRED, name, *retire])
        self.db.execute("UPDATE deployments SET traffic = NULL WHERE name = ?", [name])
        if current is not None and current != number:
            self.db.execute("UPDATE versions SET state = ? WHERE deployment = ? AND number = ?",
                            [STANDBY, name, current])
        self.db.execute("UPDATE versions SET state = ? WHERE deployment = ? AND number = ?",
                        [ACTIVE, name, number])
        self.db.execute("UPDATE deployments SET active_version = ?, updated = ? WHERE name = ?",
                        [number, now(), name])


def split_text(traffic: dict[int, int] | None) -> str:
    if not traffic:
        return "all traffic to the active version"
    return " ".join(f"{v}={w}" for v, w in sorted(traffic.items(), key=lambda i: int(i[0])))


def _decode(row: dict) -> dict:
    for key in ("options", "meta", "labels"):
        if key in row and isinstance(row[key], str):
            row[key] = json.loads(row[key]) if row[key] else {}
    if isinstance(row.get("transformer"), str):
        row["transformer"] = json.loads(row["transformer"])
    if "labels" in row and row["labels"] is None:
        row["labels"] = {}
    if row.get("traffic"):
        row["traffic"] = {int(k): w for k, w in json.loads(row["traffic"]).items()}
    return row
