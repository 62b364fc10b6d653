"""The gRPC server of one worker: start, ``resize`` (a new message size limit, at once) and
``stop`` (a drain).

grpcio fixes a server's options, its message size limit (checked from a message's length
prefix, before the message is buffered) among them, when it creates it. So the server is
created with a ceiling of at least ``CEILING`` (64 MiB, the default limit) and the deployment's
own limit is checked in Python once a message is read (grpc_limits). ``resize`` to any limit
up to the ceiling is then one assignment: it applies at once to every connection and fails no
call, and a message between the limit and the ceiling costs what a message at the default
limit costs.

Past the ceiling the server has to be replaced: ``resize(..., replace=True)`` starts a second
server with the new ceiling on the same port (both bind with SO_REUSEPORT, which Linux allows
between sockets of one user) and stops the old one, which stops listening and sends its
clients an HTTP/2 GOAWAY; their next calls go to a new connection, which only the new server
can take, and the calls in progress on the old one get ``grace`` seconds. That is not free of
failures: grpcio cancels the calls that reach the old server between the start of its stop and
the client's reading of the GOAWAY (CANCELLED; a few per replacement under a busy client,
measured in tests/test_e2e_grpc_hardening.py). Without ``replace`` such a resize is refused
(``NeedsRestart``) and nothing changes.

SO_REUSEPORT would also let another program of the same user share the port unnoticed, so the
port is checked free (no listener at all) right before the first bind; main.py proved it free
before loading the model, which can take a while.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
from grpc import aio

from mserve.daemon.errors import Conflict
from mserve.daemon.worker.serving import Serving
from mserve.daemon.worker.grpc_health import Health
from mserve.daemon.worker.grpc_limits import quiet_grpc_logs
from mserve.daemon.worker.grpc_native import NativeServer
from mserve.daemon.worker.grpc_server import Servicer

FINAL_GRACE_S = 1.0  # see GrpcServer.stop
RESIZE_GRACE_S = 30.0
CEILING = 64 * 2**20  # the least message size limit a server is created with
MOST = 2**31 - 1  # grpcio's largest
NATIVE, GRPCIO = "native", "grpcio"


def front_end(environ=os.environ) -> str:
    """The gRPC front end: the worker's own HTTP/2 (native, the default) or grpcio's
    asyncio server (``MSERVE_GRPC_FRONTEND=grpcio``)."""
    return GRPCIO if environ.get("MSERVE_GRPC_FRONTEND", "").strip().lower() == GRPCIO \
        else NATIVE


class NeedsRestart(Conflict):
    """A limit past what the running server can take without being replaced."""


def ceiling(max_body: int) -> int:
    return min(max(max_body, CEILING), MOST)


class GrpcServer:
    """The started gRPC server of a worker, and the ones a resize is retiring."""

    def __init__(self, servicer: Servicer, health: Health, host: str, port: int,
                 tls: dict | None, max_body: int, front: str = NATIVE):
        self.servicer, self.health = servicer, health
        self.host, self.port, self.max_body = host, port, max_body
        self.front = front
        # the running server's own limit (the native front end has none of its own)
        self.ceiling = MOST if front == NATIVE else ceiling(max_body)
        self.tls_files = tls
        self.tls = None if not tls else (Path(tls["key"]).read_bytes(),
                                         Path(tls["cert"]).read_bytes())
        self.handlers = (servicer.handler(), health.handler())
        self.server: aio.Server | NativeServer | None = None
        self.retiring: list[aio.Server] = []  # replaced by a resize, finishing their calls
        self._changing = asyncio.Lock()

    @classmethod
    async def start(cls, serving: Serving, host: str, port: int, tls: dict | None,
                    max_body: int, join: bool = False) -> GrpcServer:
        """Bind ``host:port`` and start serving; a port that cannot be bound raises
        RuntimeError (grpcio's error), an unreadable certificate or key OSError. ``join``:
        the deployment's other processes listen there already (``--workers``)."""
        if port and not join and listeners(port):
            raise RuntimeError(f"Failed to bind to address {host}:{port}: another program "
                               "listens on that port")
        self = cls(Servicer(serving, max_body), Health(serving), host, port, tls, max_body,
                   front_end())
        quiet_grpc_logs(self.servicer.limits)
        self.server = await self._serve(self.ceiling)
        return self

    async def _serve(self, limit: int) -> aio.Server | NativeServer:
        if self.front == NATIVE:
            server = NativeServer(self.handlers, self.servicer.limits)
            self.port = await server.start(self.host, self.port, self.tls_files)
            return server
        return await self._serve_grpcio(limit)

    async def _serve_grpcio(self, limit: int) -> aio.Server:
        backlog = self.servicer.limits.pending_backlog()
        server = aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1),  # for resize; start() checked the port free
            # grpcio drops calls past its backlog as CANCELLED: our cap answers instead
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", backlog),
        ])
        server.add_generic_rpc_handlers(self.handlers)
        host, port = self.host, self.port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.tls:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([self.tls]))
        else:
            port = server.add_insecure_port(address)
        self.port = port  # the one bound when 0 was asked for (tests)
        await server.start()
        return server

    async def resize(self, max_body: int, *, replace: bool = False,
                     grace: float = RESIZE_GRACE_S) -> bool:
        """Apply a new message size limit (bytes) now. Up to the running server's ceiling it
        applies at once and fails no call. Past it, with ``replace``, a new server takes
        the port (see the module's text) and this returns True once it serves, while the
        old one finishes its calls within ``grace`` seconds; without, NeedsRestart is
        raised. Either way a refusal, or a port that cannot be bound again (RuntimeError),
        leaves the old limit in place."""
        async with self._changing:
            if self.servicer.draining:
                return False
            limits = self.servicer.limits
            if max_body <= self.ceiling:
                limits.resize(max_body)
                self.max_body = max_body
                return False
            if not replace:
                raise NeedsRestart(
                    f"--max-body-mb {max_body / 2**20:g} is more than this deployment's gRPC "
                    f"server was started for ({self.ceiling / 2**20:g} MiB); nothing changed",
                    hint="up to that it applies at once; to go higher, undeploy and deploy "
                         "again with the new --max-body-mb")
            new = await self._serve(ceiling(max_body))
            limits.resize(max_body)
            old, self.server = self.server, new
            self.max_body, self.ceiling = max_body, ceiling(max_body)
            self.retiring.append(old)
        retired = asyncio.ensure_future(old.stop(grace))  # its calls finish meanwhile
        retired.add_done_callback(lambda _: self.retiring.remove(old))
        return True

    async def stop(self, grace: float, shared: bool = False) -> None:
        """Drain, then stop. Health turns NOT_SERVING at once (watchers are told), new
        inference gets UNAVAILABLE, open streams end with UNAVAILABLE once they answered
        what they had read, and the calls in progress get up to ``grace`` seconds. The port
        keeps answering meanwhile, so a probe reads NOT_SERVING, not a refused connection.
        ``shared``: siblings of a ``--workers`` group serve the port, so this process stops
        listening and sends its clients away (GOAWAY) at once, serving what they still send
        until they have moved; nothing is refused."""
        self.health.drain()
        if shared:
            self.servicer.drain(refuse=False)
            async with self._changing:
                servers = [self.server, *self.retiring]
            await asyncio.gather(*(server.stop(grace) for server in servers))
            self.servicer.pool.shutdown(wait=False)
            return
        self.servicer.drain()
        await self.servicer.inflight.idle(grace)
        # what is left: health watches sending their last status (they then end), and
        # calls past the grace, cut after a last second
        async with self._changing:
            servers = [self.server, *self.retiring]
        await asyncio.gather(*(server.stop(FINAL_GRACE_S) for server in servers))
        self.servicer.pool.shutdown(wait=False)


def listeners(port: int) -> int:
    """How many TCP sockets listen on ``port`` (any address; 0 where /proc cannot say)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ...
            if len(fields) > 3 and fields[3] == "0A" \
                    and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count
