"""kill -9 the daemon again and again while clients send requests; count what failed.

    .venv/bin/python bench/daemon_kills.py [--kills 20] [--clients 4]

A private daemon (fresh MSERVE_HOME under /tmp) serves one affine model. N client threads
send requests back to back (keep-alive, a new connection every 50 requests, as a pool
does). The script kills the daemon with SIGKILL, waits, with no CLI command, until a new
daemon answers (a worker starts it and it adopts the workers), checks the worker's pid did
not change, waits a second of load, and does it again. It prints the requests, failures, the
time until a daemon answered again, and whether every kill kept the same worker.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import models  # noqa: E402

MSERVE = [sys.executable, "-m", "mserve.cli.main"]
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()


class Client(threading.Thread):
    def __init__(self, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.stop, self.ok, self.failed = port, stop, 0, 0

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or self.ok % 50 == 0:
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", "/v2/models/kills/infer", BODY)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.ok += 1
                    continue
            except (OSError, http.client.HTTPException):
                conn = None
            self.failed += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="msk-", dir="/tmp"))
    env = {**os.environ, "MSERVE_HOME": str(home)}
    env.pop("MSERVE_NO_AUTOSTART", None)

    def cli(*a: str) -> dict:
        out = subprocess.run([*MSERVE, *a, "--json"], env=env, capture_output=True, text=True,
                             check=True, timeout=120)
        return json.loads(out.stdout)

    def daemon_pid() -> int | None:
        try:
            return int((home / "daemon.lock").read_text().strip())
        except (OSError, ValueError):
            return None

    try:
        model = models.affine(home / "m.onnx", scale=2.0, bias=1.0)
        d = cli("deploy", str(model), "--name", "kills")["deployment"]
        stop = threading.Event()
        clients = [Client(d["port"], stop) for _ in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(1)
        back, same = [], 0
        for _ in range(args.kills):
            daemon = daemon_pid()
            os.kill(daemon, signal.SIGKILL)
            killed = time.monotonic()
            while not (daemon_pid() not in (None, daemon)
                       and cli("daemon", "status")["running"]):
                time.sleep(0.02)
            back.append(time.monotonic() - killed)
            same += cli("list")[0]["pid"] == d["pid"]
            time.sleep(1)
        stop.set()
        for c in clients:
            c.join(timeout=15)
        ok, failed = sum(c.ok for c in clients), sum(c.failed for c in clients)
        print(f"{args.kills} kill -9s of the daemon, {args.clients} clients: {ok + failed} "
              f"requests, {failed} failed ({100 * failed / max(1, ok + failed):.3f} %); a new "
              f"daemon answered after median {statistics.median(back):.2f} s (max "
              f"{max(back):.2f} s), started by a worker; same worker pid after {same} of "
              f"{args.kills} kills")
        return 0 if failed == 0 and same == args.kills else 1
    finally:
        subprocess.run([*MSERVE, "daemon", "stop"], env=env, capture_output=True, timeout=60)
        for record in (home / "workers").glob("*.json"):
            try:
                os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
