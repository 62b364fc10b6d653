"""`mserve serve` as KServe runs it: on the folder `mserve export kserve --artifact` lays
out, with the command and arguments of the exported manifests, driven by tritonclient;
SIGTERM drains a request in flight before a clean exit; and SIGTERM first turns readiness off
while it goes on serving for --drain-grace, so that nothing routed to it before then is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
TOKEN = "kserve-secret"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Served:
    """An `mserve serve` process, its ports and its stderr."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict | None = None):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, **(env or {})})

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


IMAGE = "registry.example.com/ml/mserve:0.1.0"


def pod_command(shared, name: str, artifact: Path, *export_args: str) -> tuple[list, dict]:
    """Export NAME with --artifact, then the command line and environment its pod would run:
    the runtime's command and args with the InferenceService's args appended, /mnt/models
    being the artifact folder, on free ports."""
    import yaml

    out = shared.ok("export", "kserve", name, "--artifact", artifact, "--image", IMAGE,
                    *export_args).stdout
    runtime, isvc = list(yaml.safe_load_all(out))
    container = runtime["spec"]["containers"][0]
    model = isvc["spec"]["predictor"]["model"]
    port, grpc_port = free_ports(2)
    ports = {"8080": str(port), "8081": str(grpc_port)}
    command = [str(artifact) if a == "/mnt/models" else a for a in container["command"]]
    args = [ports.get(a, a).replace("{{.Name}}", name) for a in container["args"]] + \
        model["args"]  # KServe fills in {{.Name}}, the InferenceService's name
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if "env" in model:  # the Secret KServe would read the token from
        assert model["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "token"
        env["MSERVE_TOKEN"] = TOKEN
    cli = [sys.executable, "-m", "mserve.cli.main"] + command[1:]
    return cli + args + ["--host", "127.0.0.1"], {**env, "MSERVE_DRAIN_TIMEOUT": "20",
                                                  "MSERVE_DRAIN_GRACE": "0.5"}


@pytest.fixture
def serving():
    started = []
    yield lambda *a, **kw: started.append(Served(*a, **kw)) or started[-1]
    for served in started:
        served.stop()


def test_serve_an_exported_artifact_with_tritonclient(shared, tmp_path, serving):
    import tritonclient.http as triton

    source = models.affine(tmp_path / "src" / "recs.onnx", scale=3.0, bias=1.0)
    shared.json("deploy", source, "--name", "kserve_recs", "--max-batch-size", "8",
                "--token", TOKEN)
    artifact = tmp_path / "artifact"
    command, env = pod_command(shared, "kserve_recs", artifact)
    assert sorted(p.name for p in artifact.iterdir()) == ["model.onnx"]
    assert "--max-batch-size" in command and "--grpc-port" in command
    served = serving(command, int(command[command.index("--port") + 1]),
                     tmp_path / "serve.log", env)
    wait_for(served.ready, timeout=60, what="mserve serve ready")
    assert f"serving kserve_recs on {served.url}" in served.log.read_text()

    client = triton.InferenceServerClient(f"127.0.0.1:{served.port}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("kserve_recs", headers=auth)
    meta = client.get_model_metadata("kserve_recs", headers=auth)
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 4]
    x = triton.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4), binary_data=True)
    result = client.infer("kserve_recs", [x], headers=auth)
    np.testing.assert_allclose(result.as_numpy("y"),
                               np.arange(8, dtype=np.float32).reshape(2, 4) * 3 + 1)
    assert result.get_response()["model_version"] == "1"
    r = httpx.post(served.url + "/v2/models/kserve_recs/infer", json={"inputs": []})
    assert r.status_code == 401  # the token carried over through the Secret
    grpc_port = command[command.index("--grpc-port") + 1]
    assert f"(gRPC 127.0.0.1:{grpc_port})" in served.log.read_text()
    grpc = pytest.importorskip("tritonclient.grpc")
    grpc_client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert grpc_client.is_server_ready()
    meta = grpc_client.get_model_metadata("kserve_recs",
                                          headers={"authorization": f"Bearer {TOKEN}"})
    assert meta.name == "kserve_recs"
    grpc_client.close()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    shared.ok("undeploy", "kserve_recs")


def test_serve_reads_the_triton_layout(shared, affine_v1, tmp_path, serving):
    shared.json("deploy", affine_v1, "--name", "kserve_tri")
    artifact = tmp_path / "repo"
    shared.ok("export", "kserve", "kserve_tri", "--runtime", "triton", "--artifact", artifact)
    assert (artifact / "kserve_tri" / "1" / "model.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in (artifact / "kserve_tri" / "config.pbtxt").read_text()
    port, grpc_port = free_ports(2)
    served = serving([sys.executable, "-m", "mserve.cli.main", "serve", str(artifact),
                      "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                      str(grpc_port)], port, tmp_path / "serve.log")
    wait_for(served.ready, timeout=60, what="mserve serve ready")
    assert httpx.get(served.url + "/v2/models/kserve_tri").json()["name"] == "kserve_tri"
    err = shared.fail("export", "kserve", "kserve_tri", "--artifact", artifact, "--image", IMAGE)
    assert "not an empty folder" in err
    shared.ok("undeploy", "kserve_tri")


def test_sigterm_drains_a_request_in_flight_then_exits_0(shared, tmp_path, serving):
    shared.json("deploy", models.slow(tmp_path / "slow.onnx"), "--name", "kserve_slow")
    artifact = tmp_path / "artifact"
    command, env = pod_command(shared, "kserve_slow", artifact)
    served = serving(command, int(command[command.index("--port") + 1]),
                     tmp_path / "serve.log", env)
    wait_for(served.ready, timeout=60, what="mserve serve ready")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                       {"name": "n", "datatype": "INT64", "shape": [], "data": [3_000_000]}]}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, served.url + "/v2/models/kserve_slow/infer",
                              json=body, timeout=60)
        wait_for(lambda: 'mserve_queue_depth{model="kserve_slow",version="1"} 1.0' in httpx.get(served.url + "/metrics").text,
                 what="a request in flight")
        served.proc.send_signal(signal.SIGTERM)
        answer = pending.result()
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert served.proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(served.url + "/v2/health/live", timeout=2)
    assert "stopping: signal" in served.log.read_text()
    shared.ok("undeploy", "kserve_slow")


class Routed:
    """Traffic as a Service's endpoints send it: clients keep sending (one on a keep-alive
    connection, one on a new connection per request) while a probe polls readiness; once the
    probe reads not ready, sending goes on for ``lag`` seconds more (the endpoints taking
    that long to drop the pod) and stops. ``refused`` lists what failed of what was sent."""

    def __init__(self, url: str, path: str, body: dict, lag: float = 1.0):
        self.url, self.path, self.body, self.lag = url, path, body, lag
        self.sent = self.ok = 0
        self.refused: list[str] = []
        self.not_ready_at: float | None = None  # monotonic time the probe first read 503
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._probe, daemon=True)] + [
            threading.Thread(target=self._send, args=(keep,), daemon=True)
            for keep in (True, False)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.ok >= 20, timeout=30, what="traffic flowing")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def routed(self) -> bool:
        return self.not_ready_at is None or time.monotonic() < self.not_ready_at + self.lag

    def wait_unrouted(self, timeout: float = 30) -> None:
        try:
            wait_for(lambda: not self.routed(), timeout=timeout, what="readiness to turn off")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; meanwhile {len(self.refused)} of {self.sent} "
                                 f"requests refused: {self.refused[-1:]}") from None
        finally:
            self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _probe(self) -> None:
        while not self._stop.is_set() and self.not_ready_at is None:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 503:
                    self.not_ready_at = time.monotonic()
            except httpx.TransportError:
                pass  # a probe that fails counts as not ready only once it answers 503
            time.sleep(0.1)

    def _send(self, keep_alive: bool) -> None:
        client = httpx.Client(timeout=30) if keep_alive else None
        while not self._stop.is_set() and self.routed():
            try:
                if client is not None:
                    r = client.post(self.url + self.path, json=self.body)
                else:
                    r = httpx.post(self.url + self.path, json=self.body, timeout=30)
                outcome = None if r.status_code == 200 else f"{r.status_code} {r.text[:80]}"
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.sent += 1
                if outcome is None:
                    self.ok += 1
                else:
                    self.refused.append(outcome)
            time.sleep(0.01)
        if client is not None:
            client.close()


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def grpc_health(port: int) -> int:
    import grpc

    from mserve.daemon.protocol.proto import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


AFFINE_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                           "data": [1, 2, 3, 4]}]}


def test_sigterm_turns_ready_off_and_serves_through_the_grace(tmp_path, serving):
    from mserve.daemon.protocol.proto import health_pb2

    model = models.affine(tmp_path / "graceful" / "model.onnx", scale=2.0)
    port, grpc_port = free_ports(2)
    grace = 3.0
    served = serving([sys.executable, "-m", "mserve.cli.main", "serve", str(model.parent),
                      "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                      str(grpc_port)], port, tmp_path / "serve.log",
                     {"MSERVE_DRAIN_GRACE": str(grace)})
    wait_for(served.ready, timeout=60, what="mserve serve ready")
    assert grpc_health(grpc_port) == health_pb2.HealthCheckResponse.SERVING
    with Routed(served.url, "/v2/models/graceful/infer", AFFINE_BODY) as traffic:
        sigterm = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        traffic.wait_unrouted()
        # still within the grace: not ready, live, and serving new connections over both
        assert time.monotonic() - sigterm < grace
        assert httpx.get(served.url + "/v2/health/ready").status_code == 503
        assert httpx.get(served.url + "/v2/health/live").status_code == 200
        r = httpx.post(served.url + "/v2/models/graceful/infer", json=AFFINE_BODY)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2, 4, 6, 8]
        assert r.headers["connection"] == "close"  # keep-alive clients reconnect elsewhere
        assert grpc_health(grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert traffic.refused == [], (f"{len(traffic.refused)} of {traffic.sent} routed requests "
                                   f"refused: {traffic.refused[:3]}")
    assert traffic.ok > 20
    wait_for(lambda: refuses(port), timeout=grace + 10, what="the port to close")
    assert time.monotonic() - sigterm >= grace - 0.2
    assert served.proc.wait(timeout=30) == 0
    log = served.log.read_text()
    assert "not ready; serving 3 s more" in log and "stopping: signal" in log


def test_a_second_sigterm_skips_the_rest_of_the_grace(tmp_path, serving):
    model = models.affine(tmp_path / "impatient" / "model.onnx")
    port, grpc_port = free_ports(2)
    served = serving([sys.executable, "-m", "mserve.cli.main", "serve", str(model.parent),
                      "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                      str(grpc_port), "--drain-grace", "60"], port, tmp_path / "serve.log",
                     {"MSERVE_DRAIN_GRACE": "0"})  # the option wins over the variable
    wait_for(served.ready, timeout=60, what="mserve serve ready")
    served.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(served.url + "/v2/health/ready").status_code == 503,
             what="readiness to turn off")
    assert httpx.get(served.url + "/v2/health/live").status_code == 200
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=15) == 0
    assert "not ready; serving 60 s more" in served.log.read_text()
