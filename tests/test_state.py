"""Unit tests for daemon/state.py: SQLite state, version states, events, transactions."""

from __future__ import annotations

import sqlite3

import pytest

from mserve.daemon import state as state_mod
from mserve.daemon.state import ACTIVE, FAILED, RETIRED, STANDBY, State


def version(number: int, sha: str | None = None, **extra) -> dict:
    return {"number": number, "sha256": sha or f"{number:02d}" * 32, "size": 100 + number,
            "source": f"/models/v{number}.onnx", **extra}


def deployment(port: int = 8001, **extra) -> dict:
    return {"port": port, "host": "127.0.0.1", "options": {"threads": 2}, **extra}


def states(st: State, name: str) -> dict[int, str]:
    return {v["number"]: v["state"] for v in st.versions(name)}


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
def st(db_path):
    s = State(db_path)
    yield s
    s.close()


# ---- schema and migrations -------------------------------------------------------------

def test_new_db_has_tables_and_records_migration(st):
    assert {"migrations", "deployments", "versions", "events"} <= set(st.db.table_names())
    assert [r["name"] for r in st.db["migrations"].rows] == [n for n, _ in state_mod.MIGRATIONS]


def test_new_db_uses_wal(st):
    assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_keeps_data_and_does_not_rerun_migrations(db_path):
    first = State(db_path)
    first.record_deploy("recs", version(1), deployment())
    applied = list(first.db["migrations"].rows)
    first.close()

    again = State(db_path)
    try:
        assert list(again.db["migrations"].rows) == applied  # same row, same timestamp
        assert again.deployment("recs")["active_version"] == 1
        assert states(again, "recs") == {1: ACTIVE}
        assert [e["action"] for e in again.events("recs")] == ["deploy"]
    finally:
        again.close()


def test_failing_migration_is_rolled_back_entirely(db_path, monkeypatch):
    def broken(db):
        db["half_done"].create({"x": int}, pk="x")
        raise RuntimeError("migration failed midway")

    expected = {n for n, _ in state_mod.MIGRATIONS}
    monkeypatch.setattr(state_mod, "MIGRATIONS", state_mod.MIGRATIONS + [("999_broken", broken)])
    with pytest.raises(RuntimeError, match="midway"):
        State(db_path)

    raw = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        applied = {r[0] for r in raw.execute("SELECT name FROM migrations")}
    finally:
        raw.close()
    assert "half_done" not in tables
    assert applied == expected


def test_pending_migration_runs_on_reopen(db_path, monkeypatch):
    State(db_path).close()
    ran = []
    monkeypatch.setattr(state_mod, "MIGRATIONS",
                        state_mod.MIGRATIONS + [("999_extra", lambda db: ran.append(1))])
    s = State(db_path)
    s.close()
    State(db_path).close()
    assert ran == [1]


# ---- deploy / version states -----------------------------------------------------------

def test_first_deploy_creates_deployment_and_active_version(st):
    st.record_deploy("recs", version(1, meta={"inputs": ["x"]}),
                     deployment(port=8001, token_hash="h1"))
    d = st.deployment("recs")
    assert (d["port"], d["host"], d["active_version"], d["token_hash"]) == \
        (8001, "127.0.0.1", 1, "h1")
    assert d["options"] == {"threads": 2}  # decoded from JSON
    [v] = st.versions("recs")
    assert (v["number"], v["state"], v["sha256"], v["size"]) == (1, ACTIVE, "01" * 32, 101)
    assert v["meta"] == {"inputs": ["x"]}
    assert v["error"] is None


def test_missing_meta_reads_as_empty_dict(st):
    st.record_deploy("recs", version(1), deployment())
    assert st.version("recs", 1)["meta"] == {}


def test_second_deploy_makes_previous_standby(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_deploy("recs", version(2), deployment())
    assert states(st, "recs") == {1: STANDBY, 2: ACTIVE}
    assert st.deployment("recs")["active_version"] == 2


def test_third_deploy_retires_the_old_standby(st):
    for n in (1, 2, 3):
        st.record_deploy("recs", version(n), deployment())
    assert states(st, "recs") == {1: RETIRED, 2: STANDBY, 3: ACTIVE}


def test_redeploy_updates_options_and_token_but_keeps_port(st):
    st.record_deploy("recs", version(1), deployment(port=8001, token_hash="old"))
    st.record_deploy("recs", version(2), {"port": 9999, "host": "0.0.0.0",
                                          "options": {"threads": 8}, "token_hash": "new"})
    d = st.deployment("recs")
    assert d["options"] == {"threads": 8}
    assert d["token_hash"] == "new"
    assert (d["port"], d["host"]) == (8001, "127.0.0.1")


def test_deploy_records_event_with_short_sha_and_source(st):
    st.record_deploy("recs", version(1, sha="ab" * 32), deployment())
    [e] = st.events("recs")
    assert (e["action"], e["version"], e["deployment"]) == ("deploy", 1, "recs")
    assert e["detail"] == "sha256 abababababab from /models/v1.onnx"
    assert e["actor"]
    assert e["time"].endswith("Z")


def test_rollback_swaps_active_and_standby(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_deploy("recs", version(2), deployment())
    st.record_activate("recs", 1)
    assert states(st, "recs") == {1: ACTIVE, 2: STANDBY}
    assert st.deployment("recs")["active_version"] == 1
    last = st.events("recs")[-1]
    assert (last["action"], last["version"], last["detail"]) == ("rollback", 1, "from version 2")


def test_activate_retired_version_retires_old_standby(st):
    for n in (1, 2, 3):
        st.record_deploy("recs", version(n), deployment())
    st.record_activate("recs", 1, action="activate")
    assert states(st, "recs") == {1: ACTIVE, 2: RETIRED, 3: STANDBY}
    assert st.events("recs")[-1]["action"] == "activate"


def test_exactly_one_active_version_after_any_sequence(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_deploy("recs", version(2), deployment())
    st.record_failed("recs", version(3), "boom")
    st.record_deploy("recs", version(4), deployment())
    st.record_activate("recs", 1)
    st.record_activate("recs", 2)
    s = states(st, "recs")
    assert list(s.values()).count(ACTIVE) == 1
    assert list(s.values()).count(STANDBY) == 1
    assert s == {1: STANDBY, 2: ACTIVE, 3: FAILED, 4: RETIRED}


# ---- failed deploys ----------------------------------------------------------------------

def test_failed_deploy_of_existing_keeps_history_and_active(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_failed("recs", version(2), "model did not load")
    assert states(st, "recs") == {1: ACTIVE, 2: FAILED}
    assert st.version("recs", 2)["error"] == "model did not load"
    assert st.deployment("recs")["active_version"] == 1
    last = st.events("recs")[-1]
    assert (last["action"], last["version"], last["detail"]) == \
        ("deploy-failed", 2, "model did not load")


def test_failed_version_stays_failed_after_later_deploys(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_failed("recs", version(2), "boom")
    st.record_deploy("recs", version(3), deployment())
    assert states(st, "recs") == {1: STANDBY, 2: FAILED, 3: ACTIVE}


def test_failed_first_deploy_leaves_only_an_event(st):
    st.record_failed("new", version(1), "bad model")
    assert st.deployment("new") is None
    assert st.versions("new") == []
    [e] = st.events("new")
    assert (e["action"], e["version"], e["detail"]) == ("deploy-failed", None, "bad model")


# ---- delete ------------------------------------------------------------------------------

def test_delete_removes_deployment_and_versions_but_keeps_events(st):
    st.record_deploy("recs", version(1), deployment(port=8001))
    st.record_deploy("other", version(1), deployment(port=8002))
    st.delete_deployment("recs")
    assert st.deployment("recs") is None
    assert st.versions("recs") == []
    assert [e["action"] for e in st.events("recs")] == ["deploy", "undeploy"]
    assert st.deployment("other") is not None
    assert states(st, "other") == {1: ACTIVE}


# ---- reads -------------------------------------------------------------------------------

def test_next_version(st):
    assert st.next_version("recs") == 1
    st.record_deploy("recs", version(1), deployment())
    st.record_deploy("recs", version(2), deployment())
    assert st.next_version("recs") == 3
    assert st.next_version("other") == 1


def test_next_version_counts_failed_versions(st):
    st.record_deploy("recs", version(1), deployment())
    st.record_failed("recs", version(2), "boom")
    assert st.next_version("recs") == 3


def test_deployments_sorted_by_name(st):
    for name, port in (("zeta", 1), ("alpha", 2), ("mid", 3)):
        st.record_deploy(name, version(1), deployment(port=port))
    assert [d["name"] for d in st.deployments()] == ["alpha", "mid", "zeta"]


def test_version_lookup_missing(st):
    assert st.version("recs", 1) is None
    assert st.deployment("recs") is None


def test_events_are_append_only_in_order_and_filtered(st):
    st.add_event("a", "one")
    st.add_event("b", "two", 3, "detail")
    st.add_event("a", "three")
    all_events = st.events()
    assert [e["action"] for e in all_events] == ["one", "two", "three"]
    ids = [e["id"] for e in all_events]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [e["action"] for e in st.events("a")] == ["one", "three"]
    b = st.events("b")[0]
    assert (b["version"], b["detail"]) == (3, "detail")


def test_events_limit_keeps_most_recent_oldest_first(st):
    for i in range(5):
        st.add_event("a", f"e{i}")
    assert [e["action"] for e in st.events("a", limit=2)] == ["e3", "e4"]
    assert [e["action"] for e in st.events(limit=3)] == ["e2", "e3", "e4"]


# ---- one transaction per write -----------------------------------------------------------

def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_first_deploy_failing_midway_writes_nothing(st, monkeypatch):
    monkeypatch.setattr(st, "_switch", boom)  # after the deployment and version inserts
    with pytest.raises(RuntimeError, match="injected"):
        st.record_deploy("recs", version(1), deployment())
    monkeypatch.undo()
    assert st.deployment("recs") is None
    assert st.versions("recs") == []
    assert st.events() == []
    assert not st.db.conn.in_transaction


def test_deploy_failing_at_event_keeps_old_state(st, monkeypatch):
    st.record_deploy("recs", version(1), deployment(token_hash="old"))
    monkeypatch.setattr(st, "_event", boom)  # the last statement of the write
    with pytest.raises(RuntimeError):
        st.record_deploy("recs", version(2), {"port": 8001, "host": "127.0.0.1",
                                              "options": {"threads": 9}, "token_hash": "new"})
    monkeypatch.undo()
    d = st.deployment("recs")
    assert (d["active_version"], d["token_hash"], d["options"]) == (1, "old", {"threads": 2})
    assert states(st, "recs") == {1: ACTIVE}
    assert len(st.events("recs")) == 1
    # and the connection still works normally afterwards
    st.record_deploy("recs", version(2), deployment())
    assert states(st, "recs") == {1: STANDBY, 2: ACTIVE}


def test_activate_failing_at_event_keeps_old_state(st, monkeypatch):
    st.record_deploy("recs", version(1), deployment())
    st.record_deploy("recs", version(2), deployment())
    monkeypatch.setattr(st, "_event", boom)
    with pytest.raises(RuntimeError):
        st.record_activate("recs", 1)
    assert states(st, "recs") == {1: STANDBY, 2: ACTIVE}
    assert st.deployment("recs")["active_version"] == 2


def test_failed_record_failing_at_event_leaves_no_version(st, monkeypatch):
    st.record_deploy("recs", version(1), deployment())
    monkeypatch.setattr(st, "_event", boom)
    with pytest.raises(RuntimeError):
        st.record_failed("recs", version(2), "bad")
    assert states(st, "recs") == {1: ACTIVE}


def test_delete_failing_at_event_keeps_everything(st, monkeypatch):
    st.record_deploy("recs", version(1), deployment())
    monkeypatch.setattr(st, "_event", boom)
    with pytest.raises(RuntimeError):
        st.delete_deployment("recs")
    assert st.deployment("recs") is not None
    assert states(st, "recs") == {1: ACTIVE}


def test_rolled_back_write_is_not_visible_after_reopen(db_path, monkeypatch):
    s = State(db_path)
    s.record_deploy("recs", version(1), deployment())
    monkeypatch.setattr(s, "_switch", boom)
    with pytest.raises(RuntimeError):
        s.record_deploy("recs", version(2), deployment())
    s.close()
    again = State(db_path)
    try:
        assert states(again, "recs") == {1: ACTIVE}
        assert again.next_version("recs") == 2
    finally:
        again.close()


def test_duplicate_version_number_is_rejected_atomically(st):
    st.record_deploy("recs", version(1), deployment())
    with pytest.raises(sqlite3.IntegrityError):
        st.record_deploy("recs", version(1, sha="ff" * 32), deployment(token_hash="x"))
    assert st.deployment("recs")["token_hash"] is None  # the UPDATE before it was undone
    assert st.version("recs", 1)["sha256"] == "01" * 32
    assert len(st.events("recs")) == 1


def test_now_format():
    t = state_mod.now()
    assert len(t) == len("2026-11-29T16:50:00.123Z")
    assert t[10] == "T" and t[19] == "." and t.endswith("Z")


# ---- writes that cannot be recorded ------------------------------------------------------

@pytest.fixture
def locked(st, db_path):
    """Another connection holds the write lock; this one gives up at once."""
    st.db.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    yield st
    other.execute("ROLLBACK")
    other.close()


def test_a_write_that_cannot_be_recorded_is_a_clear_sqlite_error(locked, db_path):
    with pytest.raises(state_mod.StateWriteError) as info:
        locked.record_deploy("recs", version(1), deployment())
    err = info.value
    assert isinstance(err, sqlite3.OperationalError)  # callers that undo on one still do
    assert err.status == 503  # locked by another writer: try again (a full disk is 507)
    assert err.message == f"could not record the change in {db_path} (database is locked); " \
                          "nothing was changed"


def test_an_event_that_cannot_be_recorded_is_logged_not_raised(locked, caplog):
    assert locked.add_event("recs", "worker-exit", None, "SIGKILL") is False
    assert "event worker-exit of recs not recorded" in caplog.text
    assert locked.events("recs") == []


def test_a_read_only_state_reads_and_refuses_every_change(db_path):
    s = State(db_path)
    s.record_deploy("recs", version(1), deployment())
    s.close()
    ro = State(db_path, read_only="the disk is full (No space left on device: /h)")
    try:
        assert ro.deployment("recs")["active_version"] == 1
        with pytest.raises(state_mod.StateWriteError, match=r"^the disk is full .*cannot "
                                                            r"record changes"):
            ro.record_activate("recs", 1)
        assert ro.add_event("recs", "restore", 1) is False
        assert [e["action"] for e in ro.events("recs")] == ["deploy"]
    finally:
        ro.close()
