"""``mserve serve --workers N``: N worker processes for the one model, with no daemon.

The foreground process proves the ports free, starts N standalone workers that share them
(SO_REUSEPORT; each with its own sessions and batcher; they ask each other for their figures
as a daemon's workers do, over private sockets in a temporary 0700 folder), says once that it
serves, and supervises: a worker that exits is started again alone (0.25 s, doubling to 30 s
while it keeps dying), the others serving meanwhile. Each worker serves on a listening socket
this process binds and keeps a copy of, so the connections a killed worker never accepted go
to the others (daemon/handoff.py) instead of being reset. SIGTERM and SIGINT go to every worker,
which each run their grace and drain as a lone ``serve`` does; the command exits when all have
(0, or 1 when the start failed). Each worker's config travels on its stdin, never in argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mserve.daemon import handoff, ports

BACKOFF_MAX_S = 30.0


class Fleet:
    def __init__(self, config: dict, count: int):
        self.config, self.count = config, count
        self.folder = tempfile.mkdtemp(prefix="mserve-serve-")  # 0700
        self.peers = [os.path.join(self.folder, f"p-{i}.sock") for i in range(count)]
        self.handoffs = [os.path.join(self.folder, f"h-{i}.sock") for i in range(count)]
        # our copy of each worker's listening socket: a killed one's queue is not lost
        self.listeners: list = [None] * count
        self.secret = secrets.token_hex(16)
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def child_config(self, index: int) -> dict:
        return {**self.config, "replica": index, "join": True, "peers": self.peers,
                "peer_secret": self.secret, "report_events": True, "parent_pid": os.getpid(),
                "handoff_socket": self.handoffs[index]}

    def spawn(self, index: int) -> tuple[subprocess.Popen, dict]:
        """Start worker ``index``; it and its start-up event (ready or failed)."""
        config = self.child_config(index)
        self.listeners[index] = handoff.hold(config["host"], config["port"], f"worker {index}")
        if self.listeners[index] is not None:
            config["listen_fd"] = self.listeners[index].fileno()
        proc = subprocess.Popen([sys.executable, "-m", "mserve.daemon.worker",
                                 self.config["name"]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                pass_fds=[config["listen_fd"]] if "listen_fd" in config else [])
        proc.stdin.write((json.dumps(config) + "\n").encode())
        proc.stdin.close()
        event = {"event": "failed", "error": f"worker {index} exited during start-up"}
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and "event" in message:
                    event = message
                    break
        proc.stdout.close()
        return proc, event

    def start(self) -> str | None:
        """Start every worker at once; None when all serve, else the first error (and none
        is left running)."""
        results: list = [None] * self.count

        def one(i: int) -> None:
            results[i] = self.spawn(i)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.procs = [proc for proc, _ in results]
        error = next((e["error"] for _, e in results if e.get("event") != "ready"), None)
        if error is not None:
            self.release()
            self.signal(signal.SIGKILL)
            for proc in self.procs:
                proc.wait()
        return error

    def hand_over(self, index: int) -> None:
        """Worker ``index`` died: the connections waiting in its socket go to the others."""
        with self.lock:
            listener, self.listeners[index] = self.listeners[index], None
            alive = [i for i, p in enumerate(self.procs) if i != index and p is not None
                     and p.poll() is None]
        if listener is not None:
            handoff.hand_over(listener, [self.handoffs[i] for i in alive])

    def release(self) -> None:
        """Close our copies of the listening sockets (stopping: the port closes with them)."""
        listeners, self.listeners = self.listeners, [None] * self.count  # no lock: a signal
        for listener in listeners:                                      # handler calls this
            if listener is not None:
                listener.close()

    def signal(self, sig: int) -> None:
        with self.lock:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)

    def watch(self, index: int) -> None:
        """Keep worker ``index`` running until the fleet stops."""
        crashes, started = 0, time.monotonic()
        while True:
            code = self.procs[index].wait()
            if self.stopping.is_set():
                return
            self.hand_over(index)
            crashes = 1 if time.monotonic() - started > 30 else crashes + 1
            delay = min(BACKOFF_MAX_S, 0.25 * 2 ** min(crashes - 1, 16))
            print(f"worker {index} (pid {self.procs[index].pid}) exited ({_exit(code)}); "
                  f"starting it again in {delay:g} s", file=sys.stderr, flush=True)
            if self.stopping.wait(delay):
                return
            proc, event = self.spawn(index)
            with self.lock:
                self.procs[index] = proc
            if self.stopping.is_set():  # stopped while it started: it stops too
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            if event.get("event") != "ready":
                print(f"worker {index} did not start again: {event.get('error')}",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)


def serve_many(config: dict, count: int) -> int:
    """Serve ``config`` (a standalone worker's) with ``count`` processes; the exit code."""
    for port, option in ((config["port"], "--port"),
                         (config["options"].get("grpc_port"), "--grpc-port")):
        if port and (problem := ports.prove_free(config["host"], port, 0, option)):
            print(f"Error: {problem}", file=sys.stderr, flush=True)
            return 1
    fleet = Fleet(config, count)
    try:
        stop = lambda sig, frame: (fleet.stopping.set(), fleet.release(),  # noqa: E731
                                   fleet.signal(sig))
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if (error := fleet.start()) is not None:
            print(f"Error: {error}", file=sys.stderr, flush=True)
            return 1
        if fleet.stopping.is_set():  # a signal came while they started: pass it on now
            fleet.signal(signal.SIGTERM)
        scheme = "https" if config["options"].get("tls") else "http"
        host = f"[{config['host']}]" if ":" in config["host"] else config["host"]
        grpc = config["options"].get("grpc_port")
        print(f"serving {config['name']} on {scheme}://{host}:{config['port']}"
              + (f" (gRPC {host}:{grpc})" if grpc else "") + f" with {count} worker processes "
              f"(pids {', '.join(str(p.pid) for p in fleet.procs)})", file=sys.stderr, flush=True)
        watchers = [threading.Thread(target=fleet.watch, args=(i,), daemon=True)
                    for i in range(count)]
        for w in watchers:
            w.start()
        fleet.stopping.wait()
        for proc in list(fleet.procs):
            proc.wait()
        return 0
    finally:
        fleet.close()


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"
