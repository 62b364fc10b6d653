"""Where mserve keeps things, and who may own them. Stdlib only (and ``errors``): the CLI
imports this at start-up.

Everything lives under one folder, ``MSERVE_HOME``; two different homes are two fully
independent installations. Without ``MSERVE_HOME`` the platform's user data folder is
used, with the socket in the user runtime folder when there is a usable one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from mserve.daemon.errors import MserveError

APP = "mserve"
SOCKET_NAME = "mserve.sock"
# AF_UNIX paths are limited to 108 bytes on Linux (104 on macOS), terminator included.
MAX_SOCKET_PATH = 100
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Paths:
    home: Path
    socket: Path

    @property
    def db(self) -> Path:
        return self.home / "state.db"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "daemon.log"

    @property
    def lock(self) -> Path:
        return self.home / "daemon.lock"

    def worker_log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def request_log(self, name: str) -> Path:
        return self.logs / f"{name}.requests.jsonl"


def resolve() -> Paths:
    """The paths of this installation, from ``MSERVE_HOME`` or the platform defaults."""
    env = os.environ.get("MSERVE_HOME")
    if env:
        home = Path(env).expanduser().absolute()
        return Paths(home=home, socket=_short_socket(home, home / SOCKET_NAME))
    import platformdirs  # only needed without MSERVE_HOME

    home = Path(platformdirs.user_data_dir(APP, appauthor=False))
    return Paths(home=home, socket=_runtime_socket(home))


def _runtime_socket(home: Path) -> Path:
    """The socket in the user runtime folder (e.g. /run/user/1000) when it exists and is ours."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _is_own_dir(runtime) and os.access(runtime, os.W_OK):
        candidate = Path(runtime) / APP / SOCKET_NAME
        if len(os.fsencode(candidate)) <= MAX_SOCKET_PATH:
            return candidate
    return _short_socket(home, home / SOCKET_NAME)


def _is_own_dir(path: str) -> bool:
    """A folder of this user's (e.g. not the user's runtime folder that sudo passed to root)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _short_socket(home: Path, wanted: Path) -> Path:
    """``wanted`` if it fits in a Unix socket address, else a private folder under /tmp named
    after the home (so each home still has its own socket). Anyone can compute that name:
    ``ensure_private_dir`` refuses the folder when another user made it first."""
    if len(os.fsencode(wanted)) <= MAX_SOCKET_PATH:
        return wanted
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(home)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mserve-{os.getuid()}-{digest}" / SOCKET_NAME


class UnsafePath(MserveError):
    """A folder or socket that another local user could control: refused, never used."""


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700, or check that the folder already there is safe:
    state and socket are for this user only.

    As ssh-agent and tmux do, a folder that another user owns is refused (the /tmp
    fallback's name is predictable, so another user can create it first), and so is a
    symbolic link that another user owns or that leads to such a folder. A folder of ours
    with a looser mode is tightened to 0700: no one else can have made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check_private_dir(path)
    os.chmod(path, 0o700)


def check_private_dir(path: Path) -> None:
    """Raise ``UnsafePath`` unless ``path`` is a folder owned by this user (reached, if it is
    a symbolic link, through a link this user owns)."""
    me = os.geteuid()
    try:
        link, st = os.lstat(path), os.stat(path)
    except OSError as exc:
        raise UnsafePath(f"cannot use '{path}': {exc.strerror}") from None
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        raise _foreign(f"'{path}' is a symbolic link owned by uid {link.st_uid}, not you "
                       f"(uid {me})")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"'{path}' exists and is not a folder",
                         hint="remove it, or choose another MSERVE_HOME")
    if st.st_uid != me:
        what = "leads to a folder" if stat.S_ISLNK(link.st_mode) else "is"
        raise _foreign(f"'{path}' {what} owned by uid {st.st_uid}, not you (uid {me})")


def check_socket(path: Path) -> bool:
    """Before anything is sent: False when there is no socket file at ``path``; True when it
    is a socket this user owns; else ``UnsafePath`` (another user's socket, or a symbolic
    link, could be someone listening in place of the daemon)."""
    try:
        st = os.lstat(path)
    except OSError:  # missing, or a folder we cannot search: connect() says which
        return False
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise _foreign(f"the socket '{path}' is a symbolic link; refusing to send anything "
                       "to it")
    if st.st_uid != me:
        raise _foreign(f"the socket '{path}' is owned by uid {st.st_uid}, not you (uid {me}); "
                       "refusing to send anything to it")
    check_private_dir(path.parent)  # else its owner could swap the socket after this check
    return stat.S_ISSOCK(st.st_mode)


async def serve_private(client, path: Path, limit: int):
    """An asyncio Unix server on ``path`` (a stale socket there removed first), created 0600
    (no moment when another user could connect); the server."""
    import asyncio  # not at import: the CLI imports this module at start-up

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(client, str(path), limit=limit)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def check_peer(sock: socket.socket, where: str | Path) -> None:
    """After connecting, before sending: refuse a socket served by another user's process
    (Linux's SO_PEERCRED, which no swap of files can fool; elsewhere ``check_socket`` on the
    file is the check)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.geteuid():
        raise _foreign(f"the socket '{where}' is served by a process of uid {uid}, not you "
                       f"(uid {os.geteuid()}); refusing to send anything to it")


def _foreign(message: str) -> UnsafePath:
    return UnsafePath(message, hint="another local user may be trying to intercept mserve's "
                                    "socket; remove it if you can, or use a different (short) "
                                    "MSERVE_HOME")


def check_name(name: str) -> str | None:
    """None when ``name`` is a valid deployment name, else a message saying why not."""
    if NAME_PATTERN.fullmatch(name):
        return None
    return (f"invalid deployment name {name!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit")
