"""`mserve serve --workers N`: N processes for one model with no daemon, sharing its ports;
both serve, figures are the whole's, a killed one comes back, SIGTERM drains them all."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _alive, wait_for
from tests.test_e2e_serve import Served, free_ports
from tests.test_e2e_workers import queued_then_killed

pytestmark = pytest.mark.e2e
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]})


def fresh(port: int, method: str, path: str, body: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """``pid``'s children, whichever of its threads started them."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return sorted(found)


def fleet(tmp_path, model) -> tuple[Served, int]:
    """``mserve serve MODEL --workers 2``, once it says it serves; it and its HTTP port."""
    port, grpc_port = free_ports(2)
    served = Served([sys.executable, "-m", "mserve.cli.main", "serve", str(model),
                     "--port", str(port), "--grpc-port", str(grpc_port), "--host", "127.0.0.1",
                     "--workers", "2", "--drain-grace", "0"], port, tmp_path / "serve.log")
    wait_for(lambda: "with 2 worker processes" in served.log.read_text() or
             served.proc.poll() is not None, timeout=60, what="the fleet to serve")
    assert served.proc.poll() is None, served.log.read_text()
    return served, port


def test_serve_with_two_workers(tmp_path, affine_v1):
    served, port = fleet(tmp_path, affine_v1)
    try:
        pids = children(served.proc.pid)
        assert len(pids) == 2
        before = {pid: cpu_ticks(pid) for pid in pids}
        for _ in range(300):
            status, text = fresh(port, "POST", "/v2/models/affine/infer", BODY)
            assert status == 200 and json.loads(text)["outputs"][0]["data"] == [1, 2, 3, 4]
        assert all(cpu_ticks(pid) > before[pid] for pid in pids)  # both answered
        for _ in range(6):  # whichever answers counts both
            text = fresh(port, "GET", "/metrics")[1]
            total = sum(s.value for f in text_string_to_metric_families(text)
                        for s in f.samples if s.name == "mserve_requests_total")
            assert total == 300
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(served.proc.pid)) == 2 and victim not in
                 children(served.proc.pid), timeout=30, what="the worker to come back")
        wait_for(lambda: all(fresh(port, "GET", "/v2/health/ready")[0] == 200
                             for _ in range(10)), timeout=30, what="both to be ready")
        assert "starting it again" in served.log.read_text()
        now = children(served.proc.pid)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0
        wait_for(lambda: not any(_alive(pid) for pid in now), what="the workers to exit")
    finally:
        served.stop()


def test_a_killed_workers_waiting_connections_are_served_by_the_other(tmp_path, affine_v1):
    served, port = fleet(tmp_path, affine_v1)
    try:
        victim = children(served.proc.pid)[1]
        outcomes = queued_then_killed(port, "affine", victim)
        assert outcomes == Counter({(200, "1"): 24}), outcomes
        wait_for(lambda: len(children(served.proc.pid)) == 2 and victim not in
                 children(served.proc.pid), timeout=30, what="the worker to come back")
    finally:
        served.stop()


def test_serve_refuses_a_bad_count(affine_v1):
    done = subprocess.run([sys.executable, "-m", "mserve.cli.main", "serve", str(affine_v1),
                           "--workers", "none"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--workers must be auto" in done.stderr, done.stderr


def test_the_workers_end_with_a_killed_command(tmp_path, affine_v1):
    served, port = fleet(tmp_path, affine_v1)
    try:
        pids = children(served.proc.pid)
        served.proc.kill()
        served.proc.wait()
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=20,
                 what="the orphaned workers to end")
    finally:
        served.stop()
