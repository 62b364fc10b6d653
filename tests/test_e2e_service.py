"""`mserve daemon install`: the unit it writes, and the unit's command run as the service
manager would run it (start, kill -9, start again: the workers are adopted)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import _alive, wait_for

pytestmark = pytest.mark.e2e


def unit_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields.setdefault(key, []).append(value)
    return fields


def test_install_writes_a_systemd_user_unit(mserve, tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    printed = mserve.ok("daemon", "install", "--print", env=env).stdout
    assert not (tmp_path / "config").exists()  # --print writes nothing
    result = mserve.json("daemon", "install", env=env)
    units = tmp_path / "config" / "systemd" / "user"
    [path] = units.glob("mserve-*.service")  # not the default home: a unit of its own
    assert result["path"] == str(path) and result["manager"] == "systemd"
    assert path.read_text() == printed
    fields = unit_fields(printed)
    assert fields["Restart"] == ["on-failure"]
    assert fields["KillMode"] == ["process"]  # its workers outlive a daemon restart
    assert f'"MSERVE_HOME={mserve.home}"' in fields["Environment"]
    assert "MSERVE_SUPERVISED=1" in fields["Environment"]
    assert fields["WantedBy"] == ["default.target"]
    assert f"systemctl --user enable --now {path.stem}" in result["next"]
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", "--user", str(path)],
                               capture_output=True, text=True)
        assert "error" not in check.stderr.lower(), check.stderr


def test_two_homes_install_two_units(mserve, tmp_path):
    """SPEC: two MSERVE_HOMEs are two independent installations: the second install wrote
    over the first one's mserve.service, and its service then ran the other home."""
    from tests.conftest import Mserve

    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    other = Mserve(tmp_path / "other")
    try:
        first = mserve.json("daemon", "install", env=env)
        second = other.json("daemon", "install", env=env)
        assert first["path"] != second["path"]
        for result, m in ((first, mserve), (second, other)):
            text = Path(result["path"]).read_text()
            assert f'"MSERVE_HOME={m.home}"' in text, text
        assert mserve.json("daemon", "install", env=env)["path"] == first["path"]  # its own
    finally:
        other.cleanup()


def test_the_units_command_restarts_and_adopts(mserve, affine_v1, tmp_path):
    fields = unit_fields(mserve.ok("daemon", "install", "--print").stdout)
    command = shlex.split(fields["ExecStart"][0])
    env = dict(mserve.env)
    for assignment in fields["Environment"]:
        key, _, value = shlex.split(assignment)[0].partition("=")
        env[key] = value

    def service() -> subprocess.Popen:  # what systemd does on start and on failure
        with open(tmp_path / "service.log", "ab") as log:
            return subprocess.Popen(command, env=env, stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    first = service()
    try:
        wait_for(lambda: json.loads(mserve.run("daemon", "status", "--json").stdout)
                 ["running"], timeout=60, what="the service's daemon")
        d = mserve.json("deploy", affine_v1, "--name", "svc")["deployment"]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert first.returncode == -signal.SIGKILL  # a failure: Restart=on-failure applies
        # Under a service manager the workers leave restarting the daemon to it.
        worker_log = mserve.home / "logs" / "svc.log"
        wait_for(lambda: "the daemon went away" in worker_log.read_text(), what="the worker")
        assert "starting one" not in worker_log.read_text()
        assert mserve.daemon_pid() is None
        second = service()
        try:
            wait_for(lambda: mserve.daemon_pid() == second.pid, timeout=60, what="restart")
            after = mserve.deployment("svc")
            assert after["pid"] == d["pid"] and after["status"] == "ready"
            assert _alive(d["pid"])
        finally:
            second.terminate()
            second.wait(timeout=60)
        assert second.returncode == 0
    finally:
        first.kill()
