"""Unit tests for daemon/paths.py: where things live, and deployment names."""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from mserve.daemon import paths
from mserve.daemon.paths import (SOCKET_NAME, UnsafePath, check_name, check_socket,
                                 ensure_private_dir, resolve)
from tests.conftest import OTHER_UID, ROOT, foreign_folder

as_root = pytest.mark.skipif(not ROOT, reason="only root can give a file to another user")


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


def test_a_folder_another_user_owns_is_refused_and_left_alone(tmp_path):
    theirs = foreign_folder(tmp_path)
    mode = stat.S_IMODE(theirs.stat().st_mode)
    with pytest.raises(UnsafePath) as caught:
        ensure_private_dir(theirs)
    uid = theirs.stat().st_uid
    me = os.geteuid()
    assert f"'{theirs}' is owned by uid {uid}, not you (uid {me})" in caught.value.message
    assert "another local user" in caught.value.hint
    assert stat.S_IMODE(theirs.stat().st_mode) == mode  # not chmod'ed: it is not ours


def test_a_link_to_another_users_folder_is_refused(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(foreign_folder(tmp_path))
    with pytest.raises(UnsafePath, match="leads to a folder owned by uid"):
        ensure_private_dir(link)


@as_root
def test_a_link_another_user_owns_is_refused(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(ours)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePath, match=f"symbolic link owned by uid {OTHER_UID}"):
        ensure_private_dir(link)


def test_our_own_link_to_our_own_folder_is_used(tmp_path):
    """MSERVE_HOME may be a link to another disk: the user's link, the user's folder."""
    target = tmp_path / "disk" / "mserve"
    target.mkdir(parents=True, mode=0o755)
    link = tmp_path / "home"
    link.symlink_to(target)
    ensure_private_dir(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UnsafePath, match="is not a folder"):
        ensure_private_dir(tmp_path / "f")


@pytest.fixture
def short_dir():
    """A folder short enough for a Unix socket path."""
    folder = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    yield folder
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_check_socket(short_dir):
    path = short_dir / SOCKET_NAME
    assert check_socket(path) is False
    with listening(path):
        assert check_socket(path) is True
        link = short_dir / "link.sock"
        link.symlink_to(path)
        with pytest.raises(UnsafePath, match="is a symbolic link; refusing to send"):
            check_socket(link)


def test_check_peer_accepts_our_own_process():
    a, b = socket.socketpair()
    with a, b:
        paths.check_peer(a, "pair")  # the other end is this process: no error


@as_root
def test_check_socket_refuses_another_users_socket(short_dir):
    path = short_dir / SOCKET_NAME
    with listening(path):
        os.chown(path, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePath) as caught:
            check_socket(path)
    assert caught.value.message == (f"the socket '{path}' is owned by uid {OTHER_UID}, not "
                                    "you (uid 0); refusing to send anything to it")


@as_root
def test_check_socket_refuses_a_socket_in_another_users_folder(short_dir):
    """Whoever owns the folder can swap the socket between the check and the connect."""
    path = short_dir / SOCKET_NAME
    with listening(path):
        os.chown(short_dir, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePath, match=f"owned by uid {OTHER_UID}"):
            check_socket(path)


@as_root
def test_runtime_socket_skips_a_runtime_dir_of_another_user(tmp_path, monkeypatch):
    """sudo keeps XDG_RUNTIME_DIR: root must not put its socket in the user's folder."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    os.chown(runtime, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert paths._runtime_socket(tmp_path) == tmp_path / SOCKET_NAME


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
