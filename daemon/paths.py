"""Where mserve keeps things. Stdlib only: the CLI imports this at start-up.

Everything lives under one folder, ``MSERVE_HOME``; two different homes are two fully
independent installations. Without ``MSERVE_HOME`` the platform's user data folder is
used, with the socket in the user runtime folder when there is a usable one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        candidate = Path(runtime) / APP / SOCKET_NAME
        if len(os.fsencode(candidate)) <= MAX_SOCKET_PATH:
            return candidate
    return _short_socket(home, home / SOCKET_NAME)


def _short_socket(home: Path, wanted: Path) -> Path:
    """``wanted`` if it fits in a Unix socket address, else a private folder under /tmp named
    after the home (so each home still has its own socket)."""
    if len(os.fsencode(wanted)) <= MAX_SOCKET_PATH:
        return wanted
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(home)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mserve-{os.getuid()}-{digest}" / SOCKET_NAME


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700: state and socket are for this user only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def check_name(name: str) -> str | None:
    """None when ``name`` is a valid deployment name, else a message saying why not."""
    if NAME_PATTERN.fullmatch(name):
        return None
    return (f"invalid deployment name {name!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit")
