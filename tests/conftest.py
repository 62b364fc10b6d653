"""Fixtures that start real daemons (each in its own short MSERVE_HOME) and clean up after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import models

CLI = [sys.executable, "-m", "mserve.cli.main"]
OTHER_UID = 65534  # nobody: "another local user" in the tests that need one
ROOT = os.geteuid() == 0


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; its value. Fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Mserve:
    """The CLI against one MSERVE_HOME, as a user runs it."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {**os.environ, "MSERVE_HOME": str(home), "MSERVE_DRAIN_TIMEOUT": "10"}
        self.env.pop("MSERVE_NO_AUTOSTART", None)

    def run(self, *args: str, input: str | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + [str(a) for a in args], input=input, capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=timeout)

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        result = self.run(*args, **kw)
        assert result.returncode == 0, f"mserve {' '.join(map(str, args))} failed:\n" \
                                       f"{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str, **kw):
        return json.loads(self.ok(*args, "--json", **kw).stdout)

    def fail(self, *args: str, code: int = 1, **kw) -> str:
        """Run a command that must fail cleanly; its stderr."""
        result = self.run(*args, **kw)
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        return result.stderr

    def daemon_pid(self) -> int | None:
        try:
            text = (self.home / "daemon.lock").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text and _alive(int(text)) else None

    def deployment(self, name: str) -> dict:
        return next(d for d in self.json("list") if d["name"] == name)

    def worker_pids(self) -> list[int]:
        """Pids of the workers that recorded themselves (they outlive a killed daemon)."""
        pids = []
        for path in (self.home / "workers").glob("*.json"):
            try:
                pid = json.loads(path.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if _alive(pid):
                pids.append(pid)
        return pids

    def cleanup(self) -> None:
        """Stop the daemon and every worker. Workers outlive a killed daemon and may start
        a new one, so repeat until neither is left."""
        for _ in range(3):
            pid = self.daemon_pid()
            if pid is not None:
                self.run("daemon", "stop", timeout=60)
                with_pgid_killed(pid)
            workers = self.worker_pids()
            for worker in workers:
                with_pgid_killed(worker)
            if pid is None and not workers:
                return
            wait_for(lambda: not any(_alive(p) for p in workers), timeout=10,
                     what="workers to exit")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def with_pgid_killed(pgid: int) -> None:
    """Kill whatever is left in the daemon's process group (its workers included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def short_home() -> Path:
    """A short path: Unix socket paths are limited to about 100 bytes."""
    return Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))


def installation():
    """A fresh MSERVE_HOME; its daemon is stopped and the folder removed afterwards."""
    home = short_home()
    m = Mserve(home)
    yield m
    m.cleanup()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mserve():
    """A fresh installation with its own daemon, for tests that stop or kill it."""
    yield from installation()


@pytest.fixture(scope="session")
def shared():
    """One daemon shared by the tests that only need distinct deployment names."""
    yield from installation()


@pytest.fixture(scope="session")
def model_dir():
    path = Path(tempfile.mkdtemp(prefix="ms-models-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def affine_v1(model_dir) -> Path:
    return models.affine(model_dir / "v1" / "affine.onnx", scale=1.0, bias=0.0)


@pytest.fixture(scope="session")
def affine_v2(model_dir) -> Path:
    return models.affine(model_dir / "v2" / "affine.onnx", scale=2.0, bias=1.0)


def foreign_folder(tmp_path: Path) -> Path:
    """A folder another user owns: made and given away as root, else an existing one."""
    if ROOT:
        folder = tmp_path / "theirs"
        folder.mkdir()
        folder.chmod(0o777)
        os.chown(folder, OTHER_UID, OTHER_UID)
        return folder
    for folder in (Path("/"), Path("/usr"), Path("/etc")):
        if folder.stat().st_uid != os.geteuid():
            return folder
    pytest.skip("no folder owned by another user on this machine")
