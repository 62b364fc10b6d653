"""The deployment's TCP ports: bind one (SO_REUSEPORT, so the deployment's processes can
share it), prove one free, and say in plain words why a port cannot be had. Stdlib only: the
daemon (proving a group's ports before its processes start), the worker and ``serve
--workers`` use the same code and the same messages."""

from __future__ import annotations

import errno
import socket
import time


def bind(host: str, port: int, retry_seconds: float, listen: bool = True,
         join: bool = False) -> socket.socket:
    """Bind the deployment's port ourselves, retrying a while if a previous worker still holds
    it (a restart after a crash); a port held by anything else is a clean error. Without
    ``listen`` it only proves the port free (the gRPC port, which the gRPC server binds).

    The socket has SO_REUSEPORT, so the deployment's other processes (``--workers``) can
    bind the port too. Linux lets only the same user share it, and the port is first proven
    free without the option (a stray server of ours would otherwise share it unnoticed),
    unless ``join``: the siblings hold it already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + retry_seconds
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if not join:
                sock.bind((host, port))  # free: nothing listens, not even one of ours
                sock.close()
                if not listen:
                    return sock
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            if listen:
                sock.listen(2048)
            sock.set_inheritable(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def prove_free(host: str, port: int, retry_seconds: float, option: str = "--port") -> str | None:
    """None when nothing listens on ``port`` (retrying a while, as ``bind`` does), else why
    it cannot be had, naming ``option``."""
    try:
        bind(host, port, retry_seconds, listen=False).close()
    except OSError as exc:
        return bind_error(exc, host, port, option)
    return None


def bind_error(exc: OSError, host: str, port: int, option: str = "--port") -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        what = "gRPC port" if option == "--grpc-port" else "port"
        return f"{what} {port} is already in use ({where}); choose another with {option}"
    if exc.errno == errno.EACCES:
        return f"no permission to bind {where} (ports below 1024 need privileges)"
    return f"cannot bind {where}: {exc.strerror or exc}"
