"""The worker process: bind the deployment's port, load its versions, serve, obey the daemon.

Started by the supervisor as ``python -m mserve.daemon.worker CONFIG_JSON``. It talks to the
daemon through JSON lines: commands on stdin, replies and events on the original stdout
(fd 1 is then pointed at stderr, so a stray print cannot corrupt the channel). End of stdin
means the daemon is gone: the worker drains and exits, so no orphan keeps the port.

With ``"standalone": true`` in the config (``mserve serve``, the container entrypoint) there
is no daemon: no control channel, events are lines on stderr, and SIGTERM/SIGINT drain and
exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time

from mserve.daemon.errors import MserveError
from mserve.daemon.worker import runtime
from mserve.daemon.worker.app import Serving, WorkerApp, configure_logging
from mserve.daemon.worker.http import HttpServer

log = logging.getLogger("mserve.worker")
EXIT_BIND, EXIT_LOAD = 3, 4


class Channel:
    """The JSON-lines pipe to the daemon (a private copy of the original stdout)."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        with self._lock:
            try:
                self._out.write(json.dumps(message) + "\n")
            except (BrokenPipeError, ValueError):
                pass  # the daemon is gone; stdin EOF will stop us


class Console:
    """Standalone mode has no daemon to tell: events become one line each on stderr."""

    def __init__(self, config: dict):
        scheme = "https" if config["options"].get("tls") else "http"
        host = f"[{config['host']}]" if ":" in config["host"] else config["host"]
        self.ready_line = f"serving {config['name']} on {scheme}://{host}:{config['port']}"
        if grpc_port := config["options"].get("grpc_port"):
            self.ready_line += f" (gRPC {host}:{grpc_port})"

    def send(self, message: dict) -> None:
        if message.get("event") == "ready":
            print(self.ready_line, file=sys.stderr, flush=True)
        elif message.get("event") == "failed":
            print(f"Error: {message['error']}", file=sys.stderr, flush=True)


def bind(host: str, port: int, retry_seconds: float, listen: bool = True) -> socket.socket:
    """Bind the deployment's port ourselves, retrying a while if a previous worker still holds
    it (a restart after a crash); a port held by anything else is a clean error. Without
    ``listen`` it only proves the port free (the gRPC port, which grpcio binds itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + retry_seconds
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
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


def load_options(opts: dict) -> dict:
    """The deployment options that runtime.load takes."""
    return {"device": opts.get("device") or "auto", "instances": opts.get("instances") or 1,
            "threads": opts.get("threads") or 0, "batching": opts.get("batching") or "auto"}


def load_versions(config: dict) -> tuple[list, int]:
    """Load the active version (required) and the standby one (best effort): (models, active)."""
    opts, models, active = config["options"], [], None
    for entry in config["versions"]:
        try:
            model = runtime.load(entry["number"], entry["path"], **load_options(opts))
        except MserveError as exc:
            if entry.get("active"):
                raise
            log.warning("standby version %s not loaded: %s", entry["number"], exc.message)
            continue
        models.append(model)
        if entry.get("active"):
            active = model.number
    return models, active


class Control:
    """Executes the daemon's commands: load, activate, ping."""

    def __init__(self, serving: Serving, channel: Channel, config: dict):
        self.serving, self.channel, self.config = serving, channel, config
        self.stopping = asyncio.Event()
        self.grpc, self._grpc_stop = None, None  # the gRPC server, once started

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        def reader():
            # os.read, not sys.stdin: a thread blocked inside a buffered reader makes the
            # interpreter abort at exit ("_enter_buffered_busy").
            pending = b""
            while chunk := os.read(0, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    with contextlib.suppress(ValueError):
                        asyncio.run_coroutine_threadsafe(self.handle(json.loads(line)), loop)
            loop.call_soon_threadsafe(self.stop, "the daemon went away")

        threading.Thread(target=reader, name="control", daemon=True).start()

    def stop(self, why: str) -> None:
        log.info("stopping: %s", why)
        self.stopping.set()
        self.stop_grpc()

    def stop_grpc(self) -> asyncio.Future | None:
        """Stop taking gRPC calls; those in flight get the drain time. Idempotent."""
        if self.grpc is not None and self._grpc_stop is None:
            grace = self.config.get("drain_s", 30)
            self._grpc_stop = asyncio.ensure_future(self.grpc.stop(grace))
        return self._grpc_stop

    async def handle(self, msg: dict) -> None:
        reply = {"id": msg.get("id")}
        try:
            reply.update(await self._do(msg))
            reply["ok"] = True
        except MserveError as exc:
            reply.update(ok=False, error=exc.message)
        except Exception as exc:  # never let a command kill the worker
            log.exception("control command %s failed", msg.get("op"))
            reply.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        self.channel.send(reply)

    async def _do(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "load":
            opts = {**self.config["options"], **msg.get("options", {})}
            self.serving.options = opts
            self.serving.log.payloads = bool(opts.get("log_payloads"))
            model = await asyncio.to_thread(runtime.load, msg["number"], msg["path"],
                                            **load_options(opts))
            self.serving.add(model)
            return {"meta": model.meta()}
        if op == "activate":
            if "token_hash" in msg:
                self.serving.token_hash = msg["token_hash"]
            self.serving.activate(msg["number"], msg.get("keep", []))
            route = msg.get("route") or {}
            self.serving.route(route.get("traffic"), route.get("labels"), route.get("sticky"))
            return {"active": msg["number"], "loaded": sorted(self.serving.models)}
        if op == "ping":
            return {"active": self.serving.active, "loaded": sorted(self.serving.models)}
        if op == "stats":
            return {"active": self.serving.active, "loaded": sorted(self.serving.models),
                    "rss_bytes": _rss_bytes(), **self.serving.recent.summary(),
                    "versions": {str(n): s.summary() for n, s in self.serving.stats.items()}}
        raise MserveError(f"unknown command {op!r}")


def tls_context(config: dict) -> ssl.SSLContext | None:
    """The server TLS context, built now so a bad certificate is a clean start-up error."""
    tls = config["options"].get("tls")
    if not tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert"], tls["key"])
    return context


async def serve(serving: Serving, loaded: tuple[list, int], sock: socket.socket,
                channel: Channel, config: dict, tls: ssl.SSLContext | None) -> int | None:
    models, active = loaded
    for model in models:
        serving.add(model)
    serving.active = active
    route = config.get("route") or {}
    serving.route(route.get("traffic"), route.get("labels"), route.get("sticky"))
    control = Control(serving, channel, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, control.stop, f"signal {sig}")
    if grpc_port := config["options"].get("grpc_port"):
        from mserve.daemon.worker.grpc_server import start_grpc

        try:
            control.grpc = await start_grpc(serving, config["host"], grpc_port,
                                            config["options"].get("tls"), serving.max_body)
        except (RuntimeError, OSError) as exc:  # bound by another since main() checked it
            channel.send({"event": "failed", "error": f"cannot serve gRPC on port {grpc_port}: "
                                                      f"{exc}"})
            return EXIT_BIND
    app = WorkerApp(serving)
    app.http = http = HttpServer(app, max_body=serving.max_body, ssl=tls, after=app.after)
    await http.start(sock)
    if not config.get("standalone"):
        control.listen(loop)
    flusher = asyncio.create_task(_flush_every_second(serving))
    channel.send({"event": "ready", "pid": os.getpid(),
                  "versions": {n: m.meta() for n, m in serving.models.items()}})
    try:
        await control.stopping.wait()
        draining = [http.drain(config.get("drain_s", 30))]
        if (grpc_stopping := control.stop_grpc()) is not None:
            draining.append(grpc_stopping)
        await asyncio.gather(*draining)
    finally:
        flusher.cancel()
        serving.log.flush()


async def _flush_every_second(serving: Serving) -> None:
    while True:
        await asyncio.sleep(1)
        serving.log.flush()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    channel = Console(config) if config.get("standalone") else Channel()
    configure_logging()
    try:
        sock = bind(config["host"], config["port"], config.get("bind_retry_s", 5.0))
    except OSError as exc:
        channel.send({"event": "failed", "error": _bind_error(exc, config)})
        return EXIT_BIND
    if grpc_port := config["options"].get("grpc_port"):
        try:
            bind(config["host"], grpc_port, config.get("bind_retry_s", 5.0), listen=False).close()
        except OSError as exc:
            sock.close()
            channel.send({"event": "failed",
                          "error": _bind_error(exc, config, grpc_port, "--grpc-port")})
            return EXIT_BIND
    serving = Serving(config["name"], token_hash=config.get("token_hash"),
                      options=config["options"])
    try:
        tls = tls_context(config)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        channel.send({"event": "failed", "error": f"cannot use the TLS certificate or key: {exc}"})
        return EXIT_LOAD
    try:
        loaded = load_versions(config)
    except MserveError as exc:
        channel.send({"event": "failed", "error": exc.message})
        return EXIT_LOAD
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    return runner(serve(serving, loaded, sock, channel, config, tls)) or 0


def _bind_error(exc: OSError, config: dict, port: int | None = None,
                option: str = "--port") -> str:
    port = port or config["port"]
    where = f"{config['host']}:{port}"
    if exc.errno == errno.EADDRINUSE:
        what = "gRPC port" if option == "--grpc-port" else "port"
        return f"{what} {port} is already in use ({where}); choose another with {option}"
    if exc.errno == errno.EACCES:
        return f"no permission to bind {where} (ports below 1024 need privileges)"
    return f"cannot bind {where}: {exc.strerror or exc}"
