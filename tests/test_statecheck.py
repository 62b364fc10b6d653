"""Unit tests for daemon/statecheck.py and daemon/backup.py: damage is found before SQLite
touches the files, backups are taken and rotated, a restore keeps what it replaces, a full
disk opens the state read-only."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from mserve.daemon import backup, statecheck
from mserve.daemon.errors import Conflict, MserveError
from mserve.daemon.state import State, StateWriteError
from mserve.daemon.statecheck import StateDamaged, open_state, wal_problem

SHA = "ab" * 32


def version(n: int, sha: str = SHA) -> dict:
    return {"number": n, "sha256": sha, "size": 10, "source": f"/m/v{n}.onnx"}


def deployment(port: int = 8001) -> dict:
    return {"port": port, "host": "127.0.0.1", "options": {}}


@pytest.fixture
def home(tmp_path):
    (tmp_path / "models" / SHA).mkdir(parents=True)
    return tmp_path


def opened(home) -> State:
    return open_state(home, home / "state.db", home / "models")


def refusal(home) -> str:
    with pytest.raises(StateDamaged) as info:
        opened(home)
    return info.value.message


def files(home) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in home.glob("state.db*")}


def crashed(home, deploys: int = 5) -> None:
    """state.db and its log as a kill -9 leaves them: every commit in the log."""
    live = home / "live"
    live.mkdir()
    s = State(live / "state.db")
    for n in range(1, deploys + 1):
        s.record_deploy(f"m{n}", version(1), deployment(8000 + n))
    for suffix in ("", "-wal"):
        shutil.copy(live / f"state.db{suffix}", home / f"state.db{suffix}")
    s.close()
    shutil.rmtree(live)


def garble(path, offset: int, n: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * n)


# ---- damage is refused, and nothing is touched ------------------------------------------

def test_a_new_home_starts_and_a_first_start_takes_no_backup(tmp_path):
    s = opened(tmp_path)
    assert s.deployments() == [] and s.read_only is None
    s.close()
    assert backup.backups(tmp_path) == []


def test_an_empty_file_without_models_is_a_first_start(tmp_path):
    (tmp_path / "state.db").write_bytes(b"")
    s = opened(tmp_path)
    assert s.deployments() == []
    s.close()


@pytest.mark.parametrize("content, why", [
    (b"", "it is empty (0 bytes) while the model store holds 1 model"),
    (b"hello, not a database\n" * 300, "it is not a SQLite database"),
])
def test_an_empty_or_foreign_file_with_models_is_refused(home, content, why):
    (home / "state.db").write_bytes(content)
    message = refusal(home)
    assert message.startswith(f"{home / 'state.db'} is damaged: {why}. ")
    assert "changed nothing" in message and "there is no backup" in message
    assert files(home) == {"state.db": content}


def test_a_database_that_lost_its_tables_is_refused_while_models_exist(home):
    sqlite3.connect(home / "state.db").execute("PRAGMA journal_mode=WAL").fetchall()
    before = files(home)
    assert "it has lost its tables while the model store holds 1 model" in refusal(home)
    assert files(home) == before
    shutil.rmtree(home / "models")
    opened(home).close()  # no model: a first start that stopped early


def test_a_missing_table_is_refused(home):
    State(home / "state.db").close()
    sqlite3.connect(home / "state.db").execute("DROP TABLE versions")
    assert "it has lost its versions table" in refusal(home)


def test_a_truncated_database_fails_its_integrity_check(home):
    s = State(home / "state.db")
    for n in range(200):
        s.add_event("recs", "restart", 1, "x" * 200)  # several pages
    s.close()
    data = (home / "state.db").read_bytes()
    assert len(data) > 8 * 4096
    (home / "state.db").write_bytes(data[:4096] + bytes(len(data) - 4096))
    message = refusal(home)
    assert "integrity check" in message or "SQLite says" in message


def test_a_crash_log_is_accepted_and_replayed(home):
    crashed(home)
    assert wal_problem(home / "state.db-wal") is None
    s = opened(home)
    assert len(s.deployments()) == 5
    s.close()


def test_a_torn_tail_or_trailing_junk_is_normal_after_a_crash(home):
    crashed(home)
    wal = home / "state.db-wal"
    os.truncate(wal, wal.stat().st_size - 1000)  # the last frame half written
    assert wal_problem(wal) is None
    with open(wal, "ab") as f:
        f.write(os.urandom(10_000))
    assert wal_problem(wal) is None


@pytest.mark.parametrize("offset, why", [
    (0, "its write-ahead log state.db-wal has a damaged header"),
    (20, "its write-ahead log state.db-wal has a damaged header"),  # a salt
    (32 + 24 + 100, "frame 1 of its write-ahead log state.db-wal is damaged; changes "
                    "committed after it would be lost"),
    (32 + 8, "frame 1 of its write-ahead log state.db-wal is damaged"),  # its salts
])
def test_a_garbled_log_is_refused_before_sqlite_drops_what_follows(home, offset, why):
    crashed(home)
    garble(home / "state.db-wal", offset)
    before = files(home)
    assert why in refusal(home)
    assert files(home) == before  # not checkpointed, not deleted


def test_a_log_restarted_over_an_older_one_is_fine(home):
    """After a checkpoint SQLite writes the log again from its start with new salts; the
    older, longer generation's frames stay behind it."""
    live = home / "live"
    live.mkdir()
    s = State(live / "state.db")
    for n in range(20):
        s.record_deploy(f"m{n}", version(1), deployment(8000 + n))
    s.db.execute("PRAGMA wal_checkpoint(RESTART)")
    s.record_deploy("last", version(1), deployment(9000))
    size = (live / "state.db-wal").stat().st_size
    for suffix in ("", "-wal"):
        shutil.copy(live / f"state.db{suffix}", home / f"state.db{suffix}")
    s.close()
    assert size > 20 * 4096  # the first generation's frames are still in the file
    assert wal_problem(home / "state.db-wal") is None
    s = opened(home)
    assert len(s.deployments()) == 21
    s.close()


def test_a_damaged_last_commit_cannot_be_told_from_a_torn_one(home):
    """Known limit: the last commit's frame damaged looks like a crash mid-write; SQLite
    keeps the state before it, which is consistent."""
    crashed(home)
    wal = home / "state.db-wal"
    garble(wal, wal.stat().st_size - 100)
    assert wal_problem(wal) is None


def test_the_log_check_is_fast(home):
    live = home / "live"
    live.mkdir()
    s = State(live / "state.db")
    s.db.execute("PRAGMA wal_autocheckpoint=0")
    for n in range(300):
        s.record_deploy(f"m{n}", version(1), deployment(8000 + n))
    shutil.copy(live / "state.db-wal", home / "state.db-wal")
    s.close()
    frames = ((home / "state.db-wal").stat().st_size - 32) // (24 + 4096)
    t = time.perf_counter()
    assert wal_problem(home / "state.db-wal") is None
    elapsed = time.perf_counter() - t
    assert frames > 900 and elapsed < 2.0, (frames, elapsed)


# ---- the message says how to recover --------------------------------------------------

def test_the_refusal_offers_the_newest_backup(home):
    s = State(home / "state.db")
    s.record_deploy("recs", version(1), deployment())
    s.close()
    opened(home).close()  # a start: backs up
    (home / "state.db").write_bytes(b"")
    message = refusal(home)
    [b] = backup.backups(home)
    assert f"the backup taken at {b.when} (1 deployment)" in message
    assert "'mserve daemon start --restore-backup'" in message


# ---- backups ---------------------------------------------------------------------------

def test_each_start_backs_up_a_consistent_copy_before_writing(home):
    crashed(home, deploys=3)  # all of it still in the log
    opened(home).close()
    [b] = backup.backups(home)
    assert b.deployments() == 3 and b.usable()
    assert not list(b.path.parent.glob("*-wal")) and not list(b.path.parent.glob(".*"))


def test_restarts_that_change_nothing_replace_the_newest_backup(home, monkeypatch):
    s = State(home / "state.db")
    s.record_deploy("recs", version(1), deployment())
    s.close()
    clock = iter(range(1_700_000_000, 1_800_000_000, 60))
    monkeypatch.setattr(backup, "_stamp", lambda: time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime(next(clock))))
    for _ in range(3):
        s = opened(home)
        s.add_event("recs", "restore", 1)  # what each start writes
        s.close()
    assert len(backup.backups(home)) == 1
    for n in range(2, 10):
        s = opened(home)
        s.record_deploy("recs", version(n, f"{n:02d}" * 32), deployment())
        s.close()
    kept = backup.backups(home)
    assert len(kept) == backup.KEEP
    assert len({b.fingerprint for b in kept}) == backup.KEEP
    assert [b.path.name for b in kept] == sorted((b.path.name for b in kept), reverse=True)


def test_a_backup_that_cannot_be_written_does_not_stop_the_start(home, caplog):
    (home / "backups").write_text("a file where the folder should be")
    s = State(home / "state.db")
    s.record_deploy("recs", version(1), deployment())
    s.close()
    s = opened(home)
    assert s.deployment("recs") is not None
    s.close()
    assert "could not back up state.db" in caplog.text


# ---- restore ---------------------------------------------------------------------------

def test_restore_puts_back_the_newest_usable_backup_and_keeps_what_it_replaces(home):
    s = State(home / "state.db")
    s.record_deploy("recs", version(1), deployment())
    s.close()
    opened(home).close()
    newest = home / "backups" / "state-29991231T235959Z-000000000000.db"
    newest.write_bytes(b"junk")  # newer, but not usable: skipped
    (home / "models" / ("cd" * 32)).mkdir()  # deployed after the backup
    (home / "state.db").write_bytes(b"")
    (home / "state.db-wal").write_bytes(b"garbage")
    answer = backup.restore(home, home / "state.db")
    assert answer["deployments"] == 1 and answer["unreferenced"] == ["cd" * 32]
    assert sorted(os.listdir(answer["replaced"])) == ["state.db", "state.db-wal"]
    assert (home / "backups" / answer["replaced"] / "state.db-wal").read_bytes() == b"garbage"
    s = opened(home)
    assert s.deployment("recs")["active_version"] == 1
    s.close()


def test_restore_without_a_backup_or_with_the_daemon_running_is_refused(home):
    with pytest.raises(MserveError, match="no usable backup"):
        backup.restore(home, home / "state.db")
    with backup._daemon_lock(home):
        with pytest.raises(Conflict, match="the daemon is running"):
            backup.restore(home, home / "state.db")


# ---- prune -----------------------------------------------------------------------------

def test_prune_is_refused_when_the_state_records_nothing_but_models_exist(home):
    s = State(home / "state.db")
    why = statecheck.prune_refusal(s, home / "models")
    assert "records no version and no event, yet the model store holds 1 model" in why
    assert "no model was deleted" in why and "--restore-backup" in why
    s.record_deploy("recs", version(1), deployment())
    s.delete_deployment("recs")  # no version left, but a history: prune may run
    assert statecheck.prune_refusal(s, home / "models") is None
    s.close()
    shutil.rmtree(home / "models")
    assert statecheck.prune_refusal(State(home / "x.db"), home / "models") is None


def test_prune_is_refused_when_the_database_fails_its_check(home, monkeypatch):
    s = State(home / "state.db")
    s.record_deploy("recs", version(1), deployment())
    monkeypatch.setattr(statecheck, "integrity", lambda conn: "*** in database main ***")
    assert "fails SQLite's integrity check" in statecheck.prune_refusal(s, home / "models")
    s.close()


# ---- a full disk -----------------------------------------------------------------------

def test_write_problem_names_a_full_disk(home, monkeypatch):
    assert statecheck.write_problem(home, home / "state.db") is None
    assert not list(home.glob(".write-probe-*"))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statecheck.os, "write", full)
    assert statecheck.write_problem(home, home / "state.db") == \
        f"the disk is full (No space left on device: {home})"
    assert not list(home.glob(".write-probe-*"))


FULL_DISK = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_FSIZE, (32767, 32767))
from mserve.daemon.statecheck import open_state
home = Path(sys.argv[1])
s = open_state(home, home / "state.db", home / "models")
print(s.read_only)
print([d["name"] for d in s.deployments()])
print(s.add_event("m1", "restore", 1))
try:
    s.record_activate("m1", 1)
except Exception as exc:
    import sqlite3
    print(type(exc).__name__, isinstance(exc, sqlite3.Error), exc.status, exc.message)
"""


@pytest.mark.parametrize("shutdown", ["clean", "kill -9"])
def test_a_full_disk_opens_the_state_read_only(home, shutdown):
    """RLIMIT_FSIZE below the 32 KiB -shm file: writes fail as on a full disk (EFBIG)."""
    if shutdown == "clean":
        s = State(home / "state.db")
        s.record_deploy("m1", version(1), deployment())
        s.close()
    else:
        crashed(home, deploys=1)  # 'm1' only in the log: SQLite must replay it
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(home)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    read_only, names, recorded, refused = run.stdout.splitlines()
    assert read_only == f"the disk is full (File too large: {home})"
    assert names == "['m1']" and recorded == "False"
    assert refused.startswith("StateWriteError True 507 the disk is full")
    assert "is open read-only and cannot record changes" in refused
    s = opened(home)  # space again: everything is there, and writable
    assert s.read_only is None and s.deployment("m1")["active_version"] == 1
    assert s.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    s.close()


def test_read_only_refuses_to_migrate(home, monkeypatch):
    State(home / "state.db").close()
    from mserve.daemon import state as state_mod

    monkeypatch.setattr(state_mod, "MIGRATIONS",
                        state_mod.MIGRATIONS + [("999_new", lambda db: None)])
    with pytest.raises(StateWriteError, match="cannot bring .* up to date \\(999_new\\)"):
        State(home / "state.db", read_only="the disk is full")


def test_the_guard_refuses_changes_while_read_only(home):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ok(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST", "DELETE"])])
    s = State(home / "state.db")
    s.read_only = "the disk is full (No space left on device: /x)"
    guarded = statecheck.read_only_guard(app, s)

    async def call(method: str, path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded),
                                     base_url="http://daemon") as c:
            return await c.request(method, path)

    import asyncio

    for method, path in [("POST", "/v1/deployments"), ("DELETE", "/v1/deployments/recs"),
                         ("POST", "/v1/deployments/recs/rollback")]:
        r = asyncio.run(call(method, path))
        assert r.status_code == 507 and "cannot record changes" in r.json()["error"]
    for method, path in [("GET", "/v1/deployments"), ("POST", "/v1/prune"),
                         ("POST", "/v1/shutdown"), ("POST", "/v1/deployments/r/versions/1/copy")]:
        assert asyncio.run(call(method, path)).status_code == 200
    s.read_only = None
    assert asyncio.run(call("POST", "/v1/deployments")).status_code == 200
    s.close()


def test_a_first_start_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(statecheck, "write_problem", lambda home, db: "the disk is full (x)")
    with pytest.raises(MserveError, match=r"^the disk is full \(x\): cannot create .*state.db"):
        opened(tmp_path)
    (tmp_path / "state.db").write_bytes(b"")
    with pytest.raises(StateWriteError, match=r"cannot bring .* up to date \(001_initial\)"):
        opened(tmp_path)
