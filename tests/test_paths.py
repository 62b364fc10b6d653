"""Unit tests for daemon/paths.py: where things live, and deployment names."""

from __future__ import annotations

import stat
import sys

import pytest

from mserve.daemon import paths
from mserve.daemon.paths import SOCKET_NAME, check_name, ensure_private_dir, resolve


# ---- resolve -----------------------------------------------------------------------------

def test_resolve_with_mserve_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MSERVE_HOME", str(tmp_path))
    p = resolve()
    assert p.home == tmp_path
    assert p.socket == tmp_path / SOCKET_NAME
    assert p.db == tmp_path / "state.db"
    assert p.models == tmp_path / "models"
    assert p.logs == tmp_path / "logs"
    assert p.daemon_log == tmp_path / "logs" / "daemon.log"
    assert p.lock == tmp_path / "daemon.lock"
    assert p.worker_log("recs") == tmp_path / "logs" / "recs.log"


def test_mserve_home_ignores_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resolve().socket == tmp_path / "home" / SOCKET_NAME


def test_relative_mserve_home_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MSERVE_HOME", "rel/home")
    home = resolve().home
    assert home.is_absolute()
    assert home == tmp_path / "rel" / "home"


def test_tilde_in_mserve_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MSERVE_HOME", "~/ms")
    assert resolve().home == tmp_path / "ms"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG folders are Linux's")
@pytest.mark.parametrize("unset", [True, False], ids=["unset", "empty"])
def test_without_mserve_home_uses_platform_folders(tmp_path, monkeypatch, unset):
    if unset:
        monkeypatch.delenv("MSERVE_HOME", raising=False)
    else:
        monkeypatch.setenv("MSERVE_HOME", "")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    p = resolve()
    assert p.home == tmp_path / "data" / "mserve"
    assert p.socket == runtime / "mserve" / SOCKET_NAME


def test_runtime_socket_falls_back_to_home_without_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths._runtime_socket(tmp_path) == tmp_path / SOCKET_NAME
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert paths._runtime_socket(tmp_path) == tmp_path / SOCKET_NAME


def test_runtime_socket_falls_back_when_path_too_long(tmp_path, monkeypatch):
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long_dir))
    assert paths._runtime_socket(tmp_path) == tmp_path / SOCKET_NAME


def test_ensure_private_dir(tmp_path):
    target = tmp_path / "a" / "b"
    ensure_private_dir(target)
    assert target.is_dir()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    target.chmod(0o755)
    ensure_private_dir(target)  # existing folder: tightened again, no error
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


# ---- check_name --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "recs", "a", "7", "my-model.v2", "under_score", "0abc", "a" * 63,
])
def test_valid_names(name):
    assert check_name(name) is None


@pytest.mark.parametrize("name", [
    "", "../x", "..", ".hidden", "has space", "UPPER", "Recs", "a" * 64, "a" * 200,
    "-lead", "_lead", "a/b", "a\\b", "recs\n", "caf\u00e9", "x:y",
])
def test_invalid_names(name):
    message = check_name(name)
    assert message is not None
    assert repr(name) in message
    assert "1-63 characters" in message
