"""The worker's side of the control channel: the daemon's commands, over a private Unix
socket that outlives any one daemon.

A daemon connects, presents the worker's secret (``hello``) and gets the worker's own
account of what it serves (``describe``); then it sends commands, one JSON line each, and
gets one reply line per command. When the daemon goes away the worker keeps serving what it
last had and accepts no change until a daemon connects again; unless the daemon said it left
on purpose (``bye``) or runs under a service manager, the worker starts a new daemon itself,
with backoff, and that daemon adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

from mserve.daemon import faults
from mserve.daemon.errors import DeployFailed, MserveError
from mserve.daemon.paths import serve_private
from mserve.daemon.worker import runtime
from mserve.daemon.worker.serving import Serving

log = logging.getLogger("mserve.worker")
HELLO_TIMEOUT_S = 5.0
EXIT_STATE_DAMAGED = 78  # the daemon's exit status for a damaged state (statecheck.py)
RESPAWN_MAX_S = 60.0
LOAD_KEYS = ("device", "instances", "threads", "batching")
BATCH_KEYS = ("max_batch_size", "batch_delay_ms", "max_queue")


def load_options(opts: dict) -> dict:
    """The deployment options that runtime.load takes."""
    return {"device": opts.get("device") or "auto", "instances": opts.get("instances") or 1,
            "threads": opts.get("threads") or 0, "batching": opts.get("batching") or "auto"}


class Control:
    """Executes the daemon's commands: describe, load, activate, options, ping, stats."""

    def __init__(self, serving: Serving, config: dict):
        self.serving, self.config = serving, config
        self.stopping = asyncio.Event()
        self.grpc, self._grpc_stop = None, None  # the gRPC server, once started
        self.http = None  # the HTTP server, once started

    def stop(self, why: str) -> None:
        log.info("stopping: %s", why)
        self.stopping.set()
        self.stop_grpc()

    def stop_grpc(self) -> asyncio.Future | None:
        """Stop taking gRPC calls; those in flight get the drain time. Idempotent."""
        if self.grpc is not None and self._grpc_stop is None:
            grace = self.config.get("drain_s", 30)
            shared = bool(self.config.get("handoff_socket"))  # a --workers group's process
            self._grpc_stop = asyncio.ensure_future(self.grpc.stop(grace, shared))
        return self._grpc_stop

    async def handle(self, msg: dict) -> dict:
        reply = {"id": msg.get("id")}
        try:
            reply.update(await self._do(msg))
            reply["ok"] = True
        except MserveError as exc:
            reply.update(ok=False, error=exc.message)
        except Exception as exc:  # never let a command kill the worker
            log.exception("control command %s failed", msg.get("op"))
            reply.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return reply

    def describe(self) -> dict:
        """What this worker serves, for a daemon deciding whether to adopt it."""
        c = self.config
        return {"name": c["name"], "pid": os.getpid(), "host": c["host"], "port": c["port"],
                "grpc_port": self.serving.options.get("grpc_port"),
                "active": self.serving.active,
                "loaded": {str(n): m.path for n, m in self.serving.models.items()},
                "options": self.serving.options}

    async def _do(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "load":
            if why := faults.refused("load", int(self.config.get("replica") or 0)):
                raise DeployFailed(why)
            if "options" in msg:
                await self.apply_options({**self.serving.options, **msg["options"]})
            model = await asyncio.to_thread(runtime.load, msg["number"], msg["path"],
                                            **load_options(self.serving.options),
                                            transformer=msg.get("transformer"))
            self.serving.add(model)
            return {"meta": model.meta()}
        if op == "activate":
            if "options" in msg:
                await self.apply_options({**self.serving.options, **msg["options"]})
            if "token_hash" in msg:
                self.serving.token_hash = msg["token_hash"]
            self.serving.activate(msg["number"], msg.get("keep", []))
            route = msg.get("route") or {}
            self.serving.route(route.get("traffic"), route.get("labels"), route.get("sticky"))
            if "peers" in msg:  # the deployment's processes, as many as it runs now
                await self.serving.siblings.configure(msg["peers"], msg.get("peer_secret"))
            return {"active": msg["number"], "loaded": sorted(self.serving.models)}
        if op == "options":
            return {"changed": await self.apply_options({**self.serving.options,
                                                          **msg["options"]})}
        if op == "describe":
            return self.describe()
        if op == "ping":
            return {"active": self.serving.active, "loaded": sorted(self.serving.models)}
        if op == "stats":
            return {"active": self.serving.active, "loaded": sorted(self.serving.models),
                    "pid": os.getpid(), "rss_bytes": rss_bytes(),
                    **self.serving.recent.summary(),
                    "versions": {str(n): s.summary() for n, s in self.serving.stats.items()}}
        raise MserveError(f"unknown command {op!r}")

    async def apply_options(self, new: dict) -> list[str]:
        """Make changed deployment options take effect now; the keys that changed. Options
        that shape how a version loads (device, threads...) apply to versions loaded from
        now on: the daemon reloads the active one when they change."""
        old, serving = self.serving.options, self.serving
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        max_body = int((new.get("max_body_mb") or 64) * 2**20)
        if max_body != serving.max_body and self.grpc is not None:
            await self.grpc.resize(max_body)  # first: a limit it cannot take changes nothing
        serving.options = new
        serving.log.payloads = bool(new.get("log_payloads"))
        if max_body != serving.max_body:
            serving.max_body = max_body
            if self.http is not None:
                self.http.max_body = max_body
        if any(k in changed for k in BATCH_KEYS):
            for model in list(serving.models.values()):
                serving.add(model)  # a new batcher with the new limits; the old one drains
        return changed


class ControlServer:
    """The private Unix socket a daemon reaches this worker on (one daemon at a time)."""

    def __init__(self, control: Control, config: dict):
        self.control, self.config = control, config
        self.path = Path(config["control_socket"])
        self.secret = config["secret"]
        self.current: asyncio.StreamWriter | None = None
        self.left_on_purpose = False
        self._server: asyncio.AbstractServer | None = None
        self._watching: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await serve_private(self._client, self.path, 16 * 2**20)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads(await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S))
        except (asyncio.TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()
            return
        if not (isinstance(hello, dict) and hello.get("op") == "hello"
                and hmac.compare_digest(str(hello.get("secret", "")), self.secret)):
            writer.close()
            return
        if self.current is not None and self.current is not writer:
            self.current.close()  # a new daemon adopts us; the old link is over
        self.current, self.left_on_purpose = writer, False
        if self._watching is not None:  # adopted: the next loss starts from a short wait
            self._watching.cancel()
            self._watching = None
        log.info("daemon %s connected", hello.get("daemon_pid", "?"))
        self._send(writer, {"id": hello.get("id"), "ok": True, **self.control.describe()})
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError):
                    self._spawn(self._answer(writer, json.loads(line)))
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:  # the worker is exiting: asyncio's stream callback
            writer.close()              # would log a cancelled task as an ERROR
            return
        if self.current is writer:
            self.current = None
            self._lost()
        writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        if msg.get("op") == "bye":  # a daemon leaving on purpose: do not replace it
            self.left_on_purpose = True
            self._send(writer, {"id": msg.get("id"), "ok": True})
            return
        self._send(writer, await self.control.handle(msg))

    def _send(self, writer: asyncio.StreamWriter, message: dict) -> None:
        if not writer.is_closing():
            writer.write((json.dumps(message) + "\n").encode())

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self) -> None:
        if self.control.stopping.is_set():
            return
        how = "left" if self.left_on_purpose else "went away"
        log.warning("the daemon %s; serving on with the last known versions, split, labels "
                    "and token (no changes until a daemon adopts this worker)", how)
        if not self.left_on_purpose and self.config.get("respawn_daemon"):
            if self._watching is not None:
                self._watching.cancel()
            self._watching = asyncio.ensure_future(self._bring_back_daemon())

    async def _bring_back_daemon(self) -> None:
        """Start a daemon when none answers, with backoff, until one adopts this worker;
        give up when a daemon refuses its damaged state (a person must act)."""
        delay, started = 0.5, None
        try:
            while self.current is None and not self.control.stopping.is_set():
                await asyncio.sleep(delay * (0.5 + random.random()))
                if self.current is not None or self.control.stopping.is_set():
                    break
                if started is not None and started.poll() == EXIT_STATE_DAMAGED:
                    log.error("the daemon refuses its damaged state (see the daemon log and "
                              "'mserve daemon start --restore-backup'); starting no more")
                    break
                if not await asyncio.to_thread(_answers, self.config["daemon_socket"]):
                    started = start_daemon(self.config.get("daemon_log")) or started
                delay = min(RESPAWN_MAX_S, delay * 2)
        except asyncio.CancelledError:
            pass


def _answers(path: str) -> bool:
    """Whether something listens on the daemon's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def start_daemon(log_path: str | None) -> subprocess.Popen | None:
    """Start ``python -m mserve.daemon`` in the background, as the CLI's autostart does; a
    second one started at the same time exits at once (the daemon's lock)."""
    log.warning("no daemon answers: starting one")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mserve.daemon"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    except OSError as exc:
        log.error("could not start the daemon: %s", exc)
        return None
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    threading.Thread(target=proc.wait, name="reap-daemon", daemon=True).start()
    return proc


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
