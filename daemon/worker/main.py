"""The worker process: bind the deployment's port, load its versions, serve, obey a daemon.

Started by the supervisor as ``python -m mserve.daemon.worker NAME`` with its config as one
JSON line on stdin (never in argv, where every local user could read the token's hash). It
reports ``ready`` or ``failed`` once, as a JSON line on the original stdout (fd 1 is then
pointed at stderr, so a stray print cannot corrupt it), and from then on takes commands on
its private control socket (control.py). The worker does not depend on the daemon that
started it: when that daemon dies, it keeps serving and a new daemon adopts it.

With ``"standalone": true`` in the config (``mserve serve``, the container entrypoint) there
is no daemon: no control channel, events are lines on stderr, and SIGTERM/SIGINT drain and
exit 0. SIGTERM first turns readiness off for ``drain_grace_s`` while serving on (``Grace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time

from mserve.daemon import faults, handoff, ports
from mserve.daemon.errors import MserveError
from mserve.daemon.fdlimit import raise_fd_limit
from mserve.daemon.worker import runtime
from mserve.daemon.worker.app import WorkerApp, configure_logging
from mserve.daemon.worker.serving import Serving
from mserve.daemon.worker.control import Control, ControlServer, load_options
from mserve.daemon.worker.http import HttpServer
from mserve.daemon.worker.lifecycle import LogRotation, Record, StartDeadline

log = logging.getLogger("mserve.worker")
EXIT_BIND, EXIT_LOAD = 3, 4


class Grace:
    """SIGTERM's first step when nobody routes for us (``mserve serve``, a pod being stopped):
    answer not ready at once (HTTP ``/v2/health/ready`` 503, gRPC health NOT_SERVING; live
    stays 200) while serving everything as before, new connections included, for ``seconds``,
    so that what sends us traffic (a Service's endpoints, a load balancer's probes) lets go
    first; answers carry ``Connection: close`` meanwhile, so keep-alive clients reconnect
    elsewhere. Then ``Control.stop``: stop listening, drain. SIGINT, a second SIGTERM or a
    grace of 0 (a daemon's worker: its daemon stops routing to it itself) stop at once."""

    def __init__(self, control: Control, seconds: float):
        self.control, self.seconds = control, seconds
        self.timer: asyncio.TimerHandle | None = None

    def begin(self, why: str) -> None:
        if self.seconds <= 0 or self.timer is not None:
            self.stop(why)
            return
        log.info("%s: not ready; serving %g s more, then draining (--drain-grace)", why,
                 self.seconds)
        self.control.serving.leaving = True
        if self.control.http is not None:
            self.control.http.leaving = True
        if self.control.grpc is not None:
            self.control.grpc.health.drain()
        self.timer = asyncio.get_running_loop().call_later(self.seconds, self.stop, why)

    def stop(self, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.control.stop(why)


class Channel:
    """The start-up report to the daemon that started us (a private copy of the original
    stdout), closed after the one event it carries."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        with self._lock:
            try:
                self._out.write(json.dumps(message) + "\n")
                self._out.close()
            except (BrokenPipeError, ValueError, OSError):
                pass  # that daemon is gone; the next one adopts us


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


def load_versions(config: dict) -> tuple[list, int]:
    """Load the active version (required) and the standby one (best effort): (models, active)."""
    opts, models, active = config["options"], [], None
    for entry in config["versions"]:
        try:
            model = runtime.load(entry["number"], entry["path"], **load_options(opts),
                                 transformer=entry.get("transformer"))
        except MserveError as exc:
            if entry.get("active"):
                raise
            log.warning("standby version %s not loaded: %s", entry["number"], exc.message)
            continue
        models.append(model)
        if entry.get("active"):
            active = model.number
    return models, active


def tls_context(config: dict) -> ssl.SSLContext | None:
    """The server TLS context, built now so a bad certificate is a clean start-up error."""
    tls = config["options"].get("tls")
    if not tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert"], tls["key"])
    return context


async def serve(serving: Serving, loaded: tuple[list, int], sock: socket.socket,
                channel: Channel | Console, config: dict, tls: ssl.SSLContext | None,
                record: Record | None = None) -> int | None:
    models, active = loaded
    for model in models:
        serving.add(model)
    serving.active = active
    route = config.get("route") or {}
    serving.route(route.get("traffic"), route.get("labels"), route.get("sticky"))
    control = Control(serving, config)
    serving.siblings.replica = int(config.get("replica") or 0)
    await serving.siblings.configure(config.get("peers") or [], config.get("peer_secret"))
    loop = asyncio.get_running_loop()
    grace = Grace(control, config.get("drain_grace_s") or 0)
    loop.add_signal_handler(signal.SIGTERM, grace.begin, f"signal {signal.SIGTERM}")
    loop.add_signal_handler(signal.SIGINT, grace.stop, f"signal {signal.SIGINT}")
    if grpc_port := config["options"].get("grpc_port"):
        from mserve.daemon.worker.grpc_server import start_grpc

        try:
            control.grpc = await start_grpc(serving, config["host"], grpc_port,
                                            config["options"].get("tls"), serving.max_body,
                                            join=bool(config.get("join")))
        except (RuntimeError, OSError) as exc:  # bound by another since main() checked it
            channel.send({"event": "failed", "error": f"cannot serve gRPC on port {grpc_port}: "
                                                      f"{exc}"})
            return EXIT_BIND
    app = WorkerApp(serving)
    app.http = control.http = http = HttpServer(app, max_body=serving.max_body, ssl=tls,
                                                after=app.after)
    await http.start(sock)
    receiver = None
    if path := config.get("handoff_socket"):  # a killed sibling's connections come here
        receiver = handoff.Receiver(path, http.take)
        receiver.start(loop)
    server = None if config.get("standalone") else ControlServer(control, config)
    if server is not None:
        await server.start()
        record.write(ready=True)  # a later daemon can reach us from now on
    rotation = LogRotation(config.get("log_path"))
    housekeeping = asyncio.create_task(_every_second(serving, rotation))
    channel.send({"event": "ready", "pid": os.getpid(),
                  "versions": {n: m.meta() for n, m in serving.models.items()}})
    try:
        await control.stopping.wait()
        if server is not None:
            server.close()  # no daemon can change or adopt a worker that is leaving
        serving.siblings.close()
        if receiver is not None:
            receiver.close(loop)
        draining = [http.drain(config.get("drain_s", 30))]
        if (grpc_stopping := control.stop_grpc()) is not None:
            draining.append(grpc_stopping)
        await asyncio.gather(*draining)
    finally:
        housekeeping.cancel()
        serving.log.flush()


async def _every_second(serving: Serving, rotation: LogRotation) -> None:
    while True:
        await asyncio.sleep(1)
        serving.log.flush()
        rotation.check()


def die_with(parent: int) -> None:
    """A worker of ``serve --workers N`` ends with its command, even one killed with SIGKILL:
    when the parent is gone (this process was handed to another), SIGTERM to itself."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def read_config(argv: list[str]) -> dict:
    """The config: argv[1] when it is JSON (``mserve serve`` in-process), else one line on
    stdin (the daemon's way: argv is visible to every local user)."""
    if len(argv) > 1 and argv[1].startswith("{"):
        return json.loads(argv[1])
    line = sys.stdin.buffer.readline()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return json.loads(line)


def main(argv: list[str]) -> int:
    config = read_config(argv)
    if parent := config.get("parent_pid"):
        die_with(parent)
    standalone = bool(config.get("standalone"))
    # ``report_events``: one of ``serve --workers N``'s processes, reporting to that command.
    channel = Console(config) if standalone and not config.get("report_events") else Channel()
    configure_logging()
    raise_fd_limit()
    record = None if standalone else Record(config)
    deadline = StartDeadline(config.get("start_timeout_s"), EXIT_LOAD)
    try:
        code = _start_and_serve(config, channel, deadline, record)
    finally:
        if record is not None:
            record.remove()
    return code


def _start_and_serve(config: dict, channel, deadline: StartDeadline, record: Record | None
                     ) -> int:
    try:
        if (fd := config.get("listen_fd")) is not None:
            sock = socket.socket(fileno=fd)  # bound and listening: the daemon's (handoff.py)
            sock.set_inheritable(False)
        else:
            sock = ports.bind(config["host"], config["port"], config.get("bind_retry_s", 5.0),
                              join=bool(config.get("join")))
    except OSError as exc:
        channel.send({"event": "failed",
                      "error": ports.bind_error(exc, config["host"], config["port"])})
        return EXIT_BIND
    if grpc_port := config["options"].get("grpc_port"):
        try:
            ports.bind(config["host"], grpc_port, config.get("bind_retry_s", 5.0),
                       listen=False, join=bool(config.get("join"))).close()
        except OSError as exc:
            sock.close()
            channel.send({"event": "failed", "error": ports.bind_error(
                exc, config["host"], grpc_port, "--grpc-port")})
            return EXIT_BIND
    if record is not None:  # only once the ports are ours: never over a live worker's record
        record.write(ready=False)
    serving = Serving(config["name"], token_hash=config.get("token_hash"),
                      options=config["options"])
    try:
        tls = tls_context(config)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        channel.send({"event": "failed", "error": f"cannot use the TLS certificate or key: {exc}"})
        return EXIT_LOAD
    faults.pause("worker-load")
    try:
        loaded = load_versions(config)
    except MserveError as exc:
        channel.send({"event": "failed", "error": exc.message})
        return EXIT_LOAD
    deadline.done()
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    return runner(serve(serving, loaded, sock, channel, config, tls, record)) or 0
