"""The daemon as a process: lock, socket, autostart, status, stop, logs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.e2e


def test_start_status_stop(mserve):
    assert mserve.json("daemon", "status")["running"] is False
    started = mserve.json("daemon", "start")
    assert started["started"] is True
    again = mserve.json("daemon", "start")
    assert again == {**started, "started": False}
    info = mserve.json("daemon", "status")
    assert info["running"] and info["pid"] == started["pid"] and info["version"]
    assert info["socket"] == str(mserve.home / "mserve.sock")
    assert "Daemon running" in mserve.ok("daemon", "status").stdout
    assert "daemon ready" in mserve.ok("daemon", "logs").stdout
    assert mserve.json("daemon", "stop")["stopped"] is True
    assert mserve.daemon_pid() is None
    assert not (mserve.home / "mserve.sock").exists()
    assert mserve.json("daemon", "stop")["stopped"] is False


def test_private_folder_and_socket(mserve):
    mserve.ok("daemon", "start")
    assert stat.S_IMODE(os.stat(mserve.home).st_mode) == 0o700
    sock = mserve.home / "mserve.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_second_daemon_refuses_and_keeps_the_socket(mserve):
    pid = mserve.json("daemon", "start")["pid"]
    second = subprocess.run([sys.executable, "-m", "mserve.daemon"], env=mserve.env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 3
    assert "already running" in second.stderr and str(pid) in second.stderr
    assert mserve.json("daemon", "status")["pid"] == pid


def test_stale_socket_is_replaced(mserve):
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(mserve.home / "mserve.sock"))  # a socket file nobody listens on
    sock.close()
    assert mserve.json("list") == []
    assert mserve.daemon_pid() is not None


def test_no_autostart_says_what_to_run(mserve):
    err = mserve.fail("list", env={"MSERVE_NO_AUTOSTART": "1"})
    assert err.startswith("Error: the mserve daemon is not running")
    assert "mserve daemon start" in err and "daemon.log" in err
    assert mserve.daemon_pid() is None


def test_foreground_run_stops_on_sigterm(mserve, affine_v1):
    proc = subprocess.Popen([sys.executable, "-m", "mserve.cli.main", "daemon", "run"],
                            env=mserve.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: mserve.run("daemon", "status", "--json").stdout.count('"running": true'),
                 what="foreground daemon")
        worker_pid = mserve.json("deploy", affine_v1, "--name", "fg")["deployment"]["pid"]
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(worker_pid, 0)
    finally:
        proc.kill()
        proc.wait()
    assert mserve.deployment("fg")["status"] == "ready"  # restored by the next command


def test_stop_returns_once_the_daemon_exited_though_its_parent_has_not_reaped_it(mserve):
    """A daemon whose parent reaps late (a container's init, a supervisor script) is a zombie
    for a while after it exited: `daemon stop` must not wait for the reaping (it waited out its
    whole deadline and then failed, 'did not exit in time')."""
    env = {**mserve.env, "MSERVE_DRAIN_TIMEOUT": "1"}  # the CLI's deadline: 16 s
    proc = subprocess.Popen([sys.executable, "-m", "mserve.cli.main", "daemon", "run"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: mserve.run("daemon", "status", "--json").stdout.count('"running": true'),
                 what="foreground daemon")
        started = time.monotonic()
        stopped = mserve.run("daemon", "stop", "--json", env=env, timeout=30)
        took = time.monotonic() - started
        # this test is its parent and has not reaped it: it is a zombie now, not running
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["stopped"] is True and took < 10
        assert mserve.json("daemon", "status")["running"] is False
    finally:
        proc.kill()
        proc.wait()


def test_the_daemon_log_as_json(mserve):
    """SPEC: every command that prints data takes --json (`mserve logs --json` printed the
    daemon log as text; `mserve daemon logs --json` was 'No such option')."""
    started = mserve.json("daemon", "start")
    for args in (("logs",), ("daemon", "logs")):
        entries = mserve.json(*args, "-n", "5")
        assert 1 <= len(entries) <= 5
        assert entries[-1]["message"] == f"daemon ready on {started['socket']}", entries
        assert {e["level"] for e in entries} == {"INFO"}
        assert all(e["time"].endswith("Z") and e["logger"] == "mserve.daemon" for e in entries)
    assert mserve.json("logs", "--since", "1h")[0]["message"].startswith("daemon ")


def test_a_long_home_gets_a_short_socket(tmp_path):
    from tests.conftest import Mserve

    home = tmp_path / ("deep-" * 20) / "home"
    m = Mserve(home)
    try:
        info = m.json("daemon", "start")
        assert len(info["socket"]) <= 100 and info["socket"] != str(home / "mserve.sock")
        assert m.json("daemon", "status")["home"] == str(home)
        assert m.json("list") == []
    finally:
        m.cleanup()
