"""The data plane outlives the control plane, through the real daemon and workers: kill -9
of the daemon under load fails no request, a worker starts a new daemon by itself and that
daemon adopts the same worker processes; workers that do not match the state are replaced,
strays are stopped, orphaned loads end by themselves, and the worker's command line carries
no secret."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import CLI, _alive, wait_for

pytestmark = pytest.mark.e2e
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()


class Load(threading.Thread):
    """Requests one after another on keep-alive connections (a new one after any error, and
    every 50 requests), counting answers that are not 200."""

    def __init__(self, port: int, name: str):
        super().__init__(daemon=True)
        self.port, self.path = port, f"/v2/models/{name}/infer"
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.done.is_set():
            try:
                if conn is None or self.ok % 50 == 0:
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", self.path, BODY, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.ok += 1
                    continue
                self.errors.append(f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = None
            self.failed += 1
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=15)


def infer(port: int, name: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", f"/v2/models/{name}/infer", BODY, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def daemon_answers(m) -> bool:
    return m.run("daemon", "status", "--json", env={"MSERVE_NO_AUTOSTART": "1"},
                 timeout=30).returncode == 0


def new_daemon(m, old: int) -> int | None:
    pid = m.daemon_pid()
    return pid if pid not in (None, old) and daemon_answers(m) else None


def daemon_log(m) -> str:
    return (m.home / "logs" / "daemon.log").read_text()


def test_kill_9_of_the_daemon_under_load_fails_no_request(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "live")["deployment"]
    pid = d["pid"]
    load = Load(d["port"], "live")
    load.start()
    try:
        wait_for(lambda: load.ok > 50, what="load to run")
        for _ in range(3):
            daemon = mserve.daemon_pid()
            os.kill(daemon, signal.SIGKILL)
            # No CLI command: the worker starts a new daemon, which adopts it.
            wait_for(lambda: new_daemon(mserve, daemon), timeout=30, what="a new daemon")
            wait_for(lambda: f"adopted live: version 1, pid {pid}" in daemon_log(mserve)
                     .split(f"daemon {mserve.daemon_pid()} starting")[-1], what="adoption")
        served = load.ok
        wait_for(lambda: load.ok > served + 20, what="load after the kills")
    finally:
        load.stop()
    assert load.failed <= (load.ok + load.failed) * 0.001, load.errors[:5]
    after = mserve.deployment("live")
    assert after["pid"] == pid and after["status"] == "ready"
    events = [e["action"] for e in mserve.json("status", "live")["events"]]
    assert events.count("adopt") == 3, events
    assert "restart" not in events and "worker-exit" not in events, events


def test_a_worker_serves_while_no_daemon_runs_and_is_adopted_later(mserve, affine_v1,
                                                                    affine_v2):
    mserve.env["MSERVE_NO_AUTOSTART"] = "1"  # workers start no daemon either
    mserve.ok("daemon", "start")
    mserve.json("deploy", affine_v1, "--name", "alone")
    d = mserve.json("deploy", affine_v2, "--name", "alone")["deployment"]
    daemon = mserve.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not _alive(daemon), what="the daemon to die")
    for _ in range(20):  # still answering, still on version 2
        assert infer(d["port"], "alone")[1]["model_version"] == "2"
    assert mserve.daemon_pid() is None  # nobody started one
    mserve.ok("daemon", "start")
    after = mserve.deployment("alone")
    assert after["pid"] == d["pid"] and after["status"] == "ready"
    assert "adopted alone: version 2" in daemon_log(mserve)
    # Changes work again on the adopted worker: rollback to the loaded standby.
    assert mserve.json("rollback", "alone")["version"] == 1
    assert infer(d["port"], "alone")[1]["model_version"] == "1"
    assert mserve.deployment("alone")["pid"] == d["pid"]


def test_a_worker_that_does_not_match_the_state_is_replaced(mserve, affine_v1):
    mserve.env["MSERVE_NO_AUTOSTART"] = "1"
    mserve.ok("daemon", "start")
    d = mserve.json("deploy", affine_v1, "--name", "drift", "--max-body-mb", "8")["deployment"]
    daemon = mserve.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not _alive(daemon), what="the daemon to die")
    db = sqlite3.connect(mserve.home / "state.db")
    options = json.loads(db.execute("SELECT options FROM deployments WHERE name='drift'")
                         .fetchone()[0])
    db.execute("UPDATE deployments SET options=? WHERE name='drift'",
               (json.dumps({**options, "max_body_mb": 16}),))
    db.commit()
    db.close()
    mserve.ok("daemon", "start")
    after = mserve.deployment("drift")
    assert after["pid"] != d["pid"] and after["status"] == "ready"
    assert not _alive(d["pid"])
    assert "does not match the state (its options differ (max_body_mb))" in daemon_log(mserve)


def test_a_worker_of_no_deployment_is_stopped(mserve, affine_v1):
    mserve.env["MSERVE_NO_AUTOSTART"] = "1"
    mserve.ok("daemon", "start")
    d = mserve.json("deploy", affine_v1, "--name", "stray")["deployment"]
    daemon = mserve.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not _alive(daemon), what="the daemon to die")
    db = sqlite3.connect(mserve.home / "state.db")  # as if the deploy was never recorded
    for table in ("versions", "events", "deployments"):
        column = "name" if table == "deployments" else "deployment"
        db.execute(f"DELETE FROM {table} WHERE {column}='stray'")
    db.commit()
    db.close()
    mserve.ok("daemon", "start")
    wait_for(lambda: not _alive(d["pid"]), timeout=15, what="the stray worker to stop")
    assert mserve.json("list") == []
    assert not (mserve.home / "workers" / "stray.json").exists()
    # Its port is free again: a new deployment can take it.
    again = mserve.json("deploy", affine_v1, "--name", "stray2", "--port", str(d["port"]))
    assert again["deployment"]["port"] == d["port"]


def test_a_worker_whose_daemon_died_mid_load_ends_itself(mserve, affine_v1):
    env = {"MSERVE_NO_AUTOSTART": "1", "MSERVE_TEST_PAUSE": "worker-load",
           "MSERVE_LOAD_TIMEOUT": "2"}
    mserve.env.update(env)
    mserve.ok("daemon", "start")
    deploy = subprocess.Popen(CLI + ["deploy", str(affine_v1), "--name", "orphan"],
                              env=mserve.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        record = mserve.home / "workers" / "orphan.json"
        wait_for(record.exists, timeout=30, what="the worker to start")
        worker = json.loads(record.read_text())["pid"]
        os.kill(mserve.daemon_pid(), signal.SIGKILL)
        deploy.communicate(timeout=30)
    finally:
        deploy.kill()
    # Its own start deadline (1.25 x MSERVE_LOAD_TIMEOUT + 2 s) ends it; nobody else would.
    wait_for(lambda: not _alive(worker), timeout=20, what="the orphaned worker to exit")


def test_a_validation_child_whose_daemon_died_ends_itself(mserve, affine_v1, affine_v2):
    mserve.env.update({"MSERVE_NO_AUTOSTART": "1", "MSERVE_TEST_PAUSE": "probe"})
    mserve.ok("daemon", "start")
    mserve.json("deploy", affine_v1, "--name", "probed")  # a first deploy has no probe
    daemon = mserve.daemon_pid()
    deploy = subprocess.Popen(CLI + ["deploy", str(affine_v2), "--name", "probed"],
                              env=mserve.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        child = wait_for(lambda: _probe_child(daemon), timeout=30, what="the probe child")
        os.kill(daemon, signal.SIGKILL)
        deploy.communicate(timeout=30)
    finally:
        deploy.kill()
    wait_for(lambda: not _alive(child), timeout=10, what="the orphaned probe to exit")


def _probe_child(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"mserve.daemon.worker.probe" in cmdline and \
                int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            return int(entry.name)
    return None


def test_the_worker_command_line_holds_no_token_or_hash(mserve, affine_v1):
    token = "s3cret-token-for-argv-check"
    mserve.json("deploy", affine_v1, "--name", "argv", "--token", token)
    d = mserve.deployment("argv")
    import hashlib

    digest = hashlib.sha256(token.encode()).hexdigest()
    cmdline = Path(f"/proc/{d['pid']}/cmdline").read_bytes()
    assert token.encode() not in cmdline and digest.encode() not in cmdline, cmdline
    environ = Path(f"/proc/{d['pid']}/environ").read_bytes()
    assert token.encode() not in environ and digest.encode() not in environ
    # ... and the worker still checks the token.
    assert infer(d["port"], "argv", {"Authorization": f"Bearer {token}"})[0] == 200
    assert infer(d["port"], "argv")[0] == 401


def test_the_worker_log_rotates(mserve, affine_v1):
    mserve.env["MSERVE_WORKER_LOG_MAX_BYTES"] = "4096"
    d = mserve.json("deploy", affine_v1, "--name", "rot")["deployment"]
    log = mserve.home / "logs" / "rot.log"
    with open(log, "ab") as f:  # as a flood of log lines would
        f.write(b"x" * 100 + b"\n" * 60)
        f.write(b"y" * 5000 + b"\n")
    wait_for(lambda: (mserve.home / "logs" / "rot.log.1").exists(), timeout=10,
             what="the log to rotate")
    assert log.stat().st_size < 4096
    # The worker writes into the new file: make it log (a daemon leaving and coming back).
    os.kill(mserve.daemon_pid(), signal.SIGKILL)
    wait_for(lambda: b"daemon" in log.read_bytes(), timeout=30, what="a line in the new log")
    assert mserve.deployment("rot")["pid"] == d["pid"]


def test_daemon_stop_keep_serving_hands_the_workers_to_the_next_daemon(mserve, affine_v1):
    d = mserve.json("deploy", affine_v1, "--name", "handover")["deployment"]
    out = mserve.json("daemon", "stop", "--keep-serving")
    assert out["stopped"] is True
    assert infer(d["port"], "handover")[0] == 200  # serving with no daemon
    worker_log = mserve.home / "logs" / "handover.log"
    wait_for(lambda: "the daemon left" in worker_log.read_text(), what="the worker to notice")
    assert mserve.daemon_pid() is None and "starting one" not in worker_log.read_text()
    mserve.ok("daemon", "start")
    after = mserve.deployment("handover")
    assert after["pid"] == d["pid"] and after["status"] == "ready"
    # A worker restarted once keeps its count across an adoption.
    os.kill(d["pid"], signal.SIGKILL)
    d = wait_for(lambda: (x := mserve.deployment("handover"))["pid"] not in (None, d["pid"])
                 and x["status"] == "ready" and x, what="the restart")
    assert d["restarts"] == 1
    mserve.json("daemon", "stop", "--keep-serving")
    mserve.ok("daemon", "start")
    assert mserve.deployment("handover")["restarts"] == 1
    # A plain stop still stops everything.
    mserve.ok("daemon", "stop")
    wait_for(lambda: not _alive(d["pid"]), timeout=30, what="the worker to stop")


def test_a_worker_whose_sticky_header_changed_is_still_adopted(mserve, affine_v1, affine_v2):
    """The options the worker holds follow every change (here `traffic --sticky-header`), so
    a restarting daemon finds it matching the state instead of replacing it."""
    mserve.env["MSERVE_NO_AUTOSTART"] = "1"
    mserve.ok("daemon", "start")
    mserve.json("deploy", affine_v1, "--name", "sticky")
    d = mserve.json("deploy", affine_v2, "--name", "sticky")["deployment"]
    mserve.json("traffic", "sticky", "1=50", "2=50", "--sticky-header", "X-User")
    daemon = mserve.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not _alive(daemon), what="the daemon to die")
    mserve.ok("daemon", "start")
    assert mserve.deployment("sticky")["pid"] == d["pid"], daemon_log(mserve)[-2000:]
    assert "does not match" not in daemon_log(mserve)
