"""Supervision that does not depend on bookkeeping, through the real daemon and workers: a
hung worker is noticed and replaced, a crashed one is restarted while SQLite cannot be
written, a change SQLite cannot record leaves the worker as the state says, and options
changed on a redeploy apply at once."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
from contextlib import contextmanager

import pytest

from tests.conftest import _alive, wait_for

pytestmark = pytest.mark.e2e


def infer(port: int, name: str, body: bytes | None = None) -> tuple[int, dict]:
    body = body or json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                           "data": [1, 2, 3, 4]}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{name}/infer", body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def live(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v2/health/live")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def record(m, name: str) -> dict:
    try:
        return json.loads((m.home / "workers" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def sqlite_locked(m):
    """Hold SQLite's write lock, as another writer (or a full disk) would: every write of
    the daemon fails after its busy timeout; reads still work."""
    db = sqlite3.connect(m.home / "state.db", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_a_stopped_worker_is_noticed_and_replaced(mserve, affine_v1):
    mserve.env.update({"MSERVE_HEALTH_INTERVAL": "0.3", "MSERVE_HEALTH_TIMEOUT": "0.5",
                       "MSERVE_HEALTH_FAILURES": "2"})
    d = mserve.json("deploy", affine_v1, "--name", "hung")["deployment"]
    os.kill(d["pid"], signal.SIGSTOP)
    try:
        after = wait_for(lambda: (x := mserve.deployment("hung"))["pid"] not in (None, d["pid"])
                         and x["status"] == "ready" and x, timeout=30, what="a replacement")
    finally:
        if _alive(d["pid"]):
            os.kill(d["pid"], signal.SIGCONT)
    assert not _alive(d["pid"])
    assert infer(after["port"], "hung")[0] == 200
    events = mserve.json("status", "hung")["events"]
    hung = [e for e in events if e["action"] == "worker-hung"]
    assert hung and "control ping" in hung[0]["detail"], events
    assert after["restarts"] == 1


def test_a_crashed_worker_restarts_while_sqlite_cannot_be_written(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "locked")["deployment"]
    with sqlite_locked(mserve):
        os.kill(d["pid"], signal.SIGKILL)
        new = wait_for(lambda: (r := record(mserve, "locked")).get("ready")
                       and r["pid"] != d["pid"] and live(d["port"]) and r,
                       timeout=60, what="the restarted worker")
        assert infer(d["port"], "locked")[0] == 200
    log = (mserve.home / "logs" / "daemon.log").read_text()
    assert "could not record" in log and "database is locked" in log
    assert mserve.deployment("locked")["pid"] == new["pid"]


def test_a_rollback_sqlite_cannot_record_leaves_the_worker_as_the_state_says(
        mserve, affine_v1, affine_v2):
    mserve.json("deploy", affine_v1, "--name", "agree")
    d = mserve.json("deploy", affine_v2, "--name", "agree")["deployment"]
    assert infer(d["port"], "agree")[1]["model_version"] == "2"
    with sqlite_locked(mserve):
        err = mserve.fail("rollback", "agree")
        assert "could not record the change" in err and "database is locked" in err
        assert infer(d["port"], "agree")[1]["model_version"] == "2"
        err = mserve.fail("label", "agree", "stable", "1")
        assert "could not record" in err
        err = mserve.fail("traffic", "agree", "1=50", "2=50")
        assert "could not record" in err
        answers = {infer(d["port"], "agree")[1]["model_version"] for _ in range(20)}
        assert answers == {"2"}  # no split took effect
    assert mserve.deployment("agree")["version"] == 2
    status, answer = infer(d["port"], "agree", None)
    assert status == 200 and answer["model_version"] == "2"


def big_body(mib: float) -> bytes:
    values = int(mib * 2**20 / 8)  # ~8 bytes per JSON float
    data = [1.5] * (values - values % 4)
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                   "shape": [len(data) // 4, 4], "data": data}]}).encode()


def test_options_changed_on_a_redeploy_apply_at_once(mserve, affine_v1, affine_v2):
    d = mserve.json("deploy", affine_v1, "--name", "opts")["deployment"]
    body = big_body(2)
    assert infer(d["port"], "opts", body)[0] == 200
    # A new version with a smaller limit: the limit applies from the switch, no restart.
    out = mserve.json("deploy", affine_v2, "--name", "opts", "--max-body-mb", "1")
    assert out["version"] == 2 and out["deployment"]["pid"] == d["pid"]
    status, answer = infer(d["port"], "opts", body)
    assert status == 413 and "1 MiB" in answer["error"], answer
    # The same bytes again with another limit: no new version, the limit applies now.
    same = mserve.json("deploy", affine_v2, "--name", "opts", "--max-body-mb", "4")
    assert same["version"] == 2 and same["changed"] is True
    assert same["options_changed"] == ["max_body_mb"]
    assert infer(d["port"], "opts", body)[0] == 200
    assert mserve.deployment("opts")["options"]["max_body_mb"] == 4
    # ... and once more with nothing new: nothing changed.
    again = mserve.json("deploy", affine_v2, "--name", "opts", "--max-body-mb", "4")
    assert again["changed"] is False and again["options_changed"] == []
    # Options that act when a version loads are refused for the same bytes, clearly.
    err = mserve.fail("deploy", affine_v2, "--name", "opts", "--batching", "off")
    assert "--batching" in err and "deploy a new version" in err
    assert mserve.deployment("opts")["pid"] == d["pid"]
    # A restart keeps the recorded limit.
    os.kill(d["pid"], signal.SIGKILL)
    wait_for(lambda: (x := mserve.deployment("opts"))["pid"] not in (None, d["pid"])
             and x["status"] == "ready", timeout=30, what="restart")
    assert infer(d["port"], "opts", body)[0] == 200


def test_a_new_token_on_an_identical_redeploy_applies_at_once(mserve, affine_v1, tmp_path):
    d = mserve.json("deploy", affine_v1, "--name", "tok")["deployment"]
    assert infer(d["port"], "tok")[0] == 200
    token = tmp_path / "token"
    token.write_text("new-secret\n")
    out = mserve.json("deploy", affine_v1, "--name", "tok", "--token-file", token)
    assert out["changed"] is True and out["options_changed"] == ["token"]
    assert out["version"] == 1 and out["deployment"]["auth"] is True
    assert infer(d["port"], "tok")[0] == 401  # no restart needed
    events = [e["action"] for e in mserve.json("status", "tok")["events"]]
    assert "reconfigure" in events
