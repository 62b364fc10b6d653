"""Connections a killed process never accepted, handed to a sibling that serves them.

With ``--workers N`` every process has its own listening socket on the shared port
(SO_REUSEPORT), and the kernel gives each new connection to one of them. When a process dies
(``kill -9``, the OOM killer), the connections waiting in its socket's queue would be reset
with it, and so would the ones the kernel routed there while the dying process was being torn
down (a few milliseconds, measured): clients saw ``connection reset`` on fresh connections
although another process served. So the daemon starts each process of a group on a listening
socket it binds itself and keeps a copy of (``pass_fds``): the process's death then leaves
the socket open. The daemon takes it out of the port (``drain``: accepts what waits, then
closes it) and sends those connections to a serving sibling over that sibling's handoff
socket (a private Unix datagram socket, SCM_RIGHTS), which serves them as its own
(``Receiver``). Only the requests the process had already read are lost.

Stdlib only: the daemon sends, the worker receives. A process adopted from an earlier daemon
was not started on a socket of ours, so its death resets its queue as before.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from mserve.daemon import ports

log = logging.getLogger("mserve.daemon")
BATCH = 64  # descriptors per datagram (the kernel takes up to 253)


def hold(host: str, port: int, who: str) -> socket.socket | None:
    """A listening socket on the shared ``port`` for a process to serve on (``pass_fds``),
    the caller keeping its copy; None (the process then binds its own) if it cannot be had."""
    try:
        return ports.bind(host, port, 0, join=True)
    except OSError as exc:
        log.warning("%s: cannot hold port %d for it (%s); it binds its own", who, port, exc)
        return None


def hand_over(listener: socket.socket, to: list[str]) -> int:
    """A process died: take its socket ``listener`` out of the port and spread the
    connections waiting there over the handoff sockets ``to`` (its live siblings'); how
    many went."""
    conns = drain(listener)
    if not to:
        for conn in conns:
            conn.close()
        return 0
    return sum(send(path, conns[i::len(to)]) for i, path in enumerate(to))


def drain(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting on ``listener``, then close it: the kernel routes no
    more there. The caller owns the connections."""
    taken: list[socket.socket] = []
    listener.setblocking(False)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # out of descriptors: what is left is reset
                log.warning("could not take over a connection: %s", exc)
                break
            taken.append(conn)
    finally:
        listener.close()
    return taken


def send(path: str, conns: list[socket.socket]) -> int:
    """Send ``conns`` to the process whose handoff socket is ``path``; how many it got. The
    connections are closed here either way (the receiver holds its own copies)."""
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.settimeout(2.0)
            for start in range(0, len(conns), BATCH):
                part = conns[start:start + BATCH]
                fds = array.array("i", [c.fileno() for c in part])
                # (socket.send_fds would drop the address)
                out.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, path)
                sent += len(part)
    except OSError as exc:
        log.warning("could not hand %d connection(s) to %s: %s", len(conns) - sent, path, exc)
    finally:
        for conn in conns:
            conn.close()
    return sent


class Receiver:
    """The worker's side: a datagram socket at ``path`` whose connections go to ``serve``
    (called with each connected socket, on the event loop)."""

    def __init__(self, path: str, serve: Callable[[socket.socket], None]):
        self.path, self.serve = path, serve
        self.sock: socket.socket | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)  # only our user may send (the folder is private too)
        try:
            sock.bind(self.path)
        except OSError as exc:  # serve anyway: a dead sibling's queue is then reset
            log.warning("cannot take connections at %s: %s", self.path, exc)
            sock.close()
            return
        finally:
            os.umask(old)
        sock.setblocking(False)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._receive)

    def _receive(self) -> None:
        while self.sock is not None:
            try:
                _, fds, _, _ = socket.recv_fds(self.sock, 16, BATCH)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff socket: %s", exc)
                return
            for fd in fds:
                self._take(fd)

    def _take(self, fd: int) -> None:
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        if conn.type != socket.SOCK_STREAM:  # only connections of our port are served
            conn.close()
            return
        conn.setblocking(False)
        try:
            self.serve(conn)
        except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the rest
            log.warning("could not serve a handed-over connection: %s", exc)
            conn.close()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

