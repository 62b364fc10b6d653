"""Another local user cannot steal a token through mserve's socket (issue 13, finding 1).

With a long MSERVE_HOME the socket lives in /tmp/mserve-UID-<hash of home>/, a name anyone
can compute. Another user who creates that folder first, or listens there, must get nothing:
the daemon refuses a folder it does not own, and the CLI checks the socket (its owner, its
folder, and the uid of the process listening on it) before it sends a byte.

Tests run as one user, so the other user is simulated: as root, files are given to uid
65534 and the fake daemon runs as that uid; tests that need that are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mserve.daemon.paths import SOCKET_NAME, _short_socket
from tests.conftest import OTHER_UID, ROOT, Mserve, foreign_folder, short_home

pytestmark = pytest.mark.e2e
as_root = pytest.mark.skipif(not ROOT, reason="simulating another user needs root (chown, "
                                              "setuid)")
TOKEN = "s3cret-of-the-victim"

# A fake daemon: listens on argv[1] and prints every byte it receives, in hex, one line per
# connection. Stdlib only, so it runs as any user.
LISTENER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(8)
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.settimeout(1)
    got = b""
    try:
        while chunk := conn.recv(65536):
            got += chunk
    except OSError:
        pass
    print(got.hex(), flush=True)
    conn.close()
"""


class Listener:
    """The fake daemon, as ``user`` (None: this user)."""

    def __init__(self, path: Path, user: int | None = None):
        python = sys.executable if user is None else shutil.which("python3", path="/usr/bin")
        if python is None:  # the venv's python may sit where another user cannot read
            pytest.skip("no /usr/bin/python3 to run another user's process")
        self.proc = subprocess.Popen([python, "-c", LISTENER, str(path)], cwd="/",
                                     stdout=subprocess.PIPE, text=True, user=user)
        assert self.proc.stdout.readline().strip() == "ready"

    def received(self) -> list[bytes]:
        """What each connection sent; the listener is stopped."""
        self.proc.kill()
        out, _ = self.proc.communicate()
        return [bytes.fromhex(line) for line in out.split()]


@pytest.fixture
def listener():
    """Start fake daemons (``listener(path, user)``); each is stopped after the test."""
    started: list[Listener] = []
    yield lambda *a, **kw: started.append(Listener(*a, **kw)) or started[-1]
    for fake in started:
        if fake.proc.poll() is None:
            fake.received()


@pytest.fixture
def long_home(affine_v1):
    """An installation whose MSERVE_HOME is too long to hold its socket: (mserve, the
    /tmp fallback folder of its socket)."""
    base = short_home()
    home = base / ("a-long-mserve-home-" * 6)
    m = Mserve(home)
    folder = _short_socket(home, home / SOCKET_NAME).parent
    assert folder.name.startswith("mserve-") and not folder.exists()
    yield m, folder
    m.cleanup()
    for path in (base, folder):
        if path.is_symlink():
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_a_long_home_gets_a_private_fallback_folder(long_home, affine_v1):
    """The fallback works, and a folder of ours with a loose mode is tightened to 0700."""
    m, folder = long_home
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    m.json("deploy", affine_v1, "--name", "far")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    sock = (folder / SOCKET_NAME).lstat()
    assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == os.geteuid()
    assert stat.S_IMODE(sock.st_mode) == 0o600


@as_root
def test_a_fallback_folder_another_user_made_first_is_refused(long_home, affine_v1, tmp_path):
    m, folder = long_home
    folder.mkdir()
    folder.chmod(0o777)
    os.chown(folder, OTHER_UID, OTHER_UID)
    err = m.fail("deploy", affine_v1, "--name", "victim", "--token-file", token_file(tmp_path))
    assert f"Error: '{folder}' is owned by uid {OTHER_UID}, not you (uid 0)" in err, err
    assert "Hint: another local user may be trying to intercept" in err
    assert m.daemon_pid() is None  # no daemon was started, nothing was bound there
    assert list(folder.iterdir()) == []
    assert folder.stat().st_uid == OTHER_UID and stat.S_IMODE(folder.stat().st_mode) == 0o777
    # the daemon itself refuses it too (`daemon run` does not go through the CLI's check)
    err = m.fail("daemon", "run", timeout=30)
    assert f"'{folder}' is owned by uid {OTHER_UID}" in err, err
    assert list(folder.iterdir()) == []


def test_a_fallback_folder_that_is_a_link_elsewhere_is_refused(long_home, affine_v1, tmp_path):
    m, folder = long_home
    theirs = foreign_folder(tmp_path)
    folder.symlink_to(theirs)
    err = m.fail("deploy", affine_v1, "--name", "victim", "--token-file", token_file(tmp_path))
    assert f"'{folder}' leads to a folder owned by uid {theirs.stat().st_uid}" in err, err
    assert m.daemon_pid() is None
    err = m.fail("daemon", "run", timeout=30)
    assert f"'{folder}' leads to a folder owned by uid" in err, err


@as_root
def test_a_fake_daemon_of_another_user_gets_nothing(long_home, affine_v1, tmp_path,
                                                     listener):
    """The attack of finding 1: the other user made the folder and listens in it."""
    m, folder = long_home
    folder.mkdir()
    folder.chmod(0o777)
    os.chown(folder, OTHER_UID, OTHER_UID)
    fake = listener(folder / SOCKET_NAME, user=OTHER_UID)
    err = m.fail("deploy", affine_v1, "--name", "victim", "--token-file", token_file(tmp_path))
    assert (f"Error: the socket '{folder / SOCKET_NAME}' is owned by uid {OTHER_UID}, not you "
            "(uid 0); refusing to send anything to it") in err, err
    assert fake.received() == []
    assert m.daemon_pid() is None


@as_root
def test_a_daemon_of_another_user_behind_our_own_socket_file_gets_nothing(mserve, affine_v1,
                                                                          tmp_path, listener):
    """Even when the file and its folder look ours, the process listening must be ours
    (SO_PEERCRED): the check that cannot be raced."""
    mserve.home.chmod(0o777)  # let the other user bind in the home, then take it back
    fake = listener(mserve.home / SOCKET_NAME, user=OTHER_UID)
    os.chown(mserve.home / SOCKET_NAME, 0, 0)
    mserve.home.chmod(0o700)
    err = mserve.fail("deploy", affine_v1, "--name", "victim", "--token-file",
                      token_file(tmp_path))
    assert f"is served by a process of uid {OTHER_UID}, not you (uid 0)" in err, err
    assert fake.received() == []


def test_a_socket_that_is_a_link_gets_nothing(mserve, listener):
    """A link at the socket's place could lead anywhere: it is never followed."""
    elsewhere = short_home()
    try:
        fake = listener(elsewhere / SOCKET_NAME)
        (mserve.home / SOCKET_NAME).symlink_to(elsewhere / SOCKET_NAME)
        err = mserve.fail("list")
        assert f"the socket '{mserve.home / SOCKET_NAME}' is a symbolic link" in err, err
        assert fake.received() == []
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_the_daemon_keeps_its_home_and_socket_private(mserve, affine_v1):
    mserve.home.chmod(0o755)  # a home the user made with a loose mode is tightened
    mserve.json("deploy", affine_v1, "--name", "mine")
    sock = (mserve.home / SOCKET_NAME).lstat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(mserve.home.stat().st_mode) == 0o700
