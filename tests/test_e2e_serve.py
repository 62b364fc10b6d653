"""`mserve serve` as KServe runs it: on the folder `mserve export kserve --artifact` lays
out, with the command and arguments of the exported manifests, driven by tritonclient; and
SIGTERM drains a request in flight before a clean exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def pod_command(shared, name: str, artifact: Path, *export_args: str) -> tuple[list, dict]:
    """Export NAME with --artifact, then the command line and environment its pod would run:
    the runtime's command and args with the InferenceService's args appended, /mnt/models
    being the artifact folder, on free ports."""
    import yaml

    out = shared.ok("export", "kserve", name, "--artifact", artifact, *export_args).stdout
    runtime, isvc = list(yaml.safe_load_all(out))
    container = runtime["spec"]["containers"][0]
    model = isvc["spec"]["predictor"]["model"]
    port, grpc_port = free_ports(2)
    ports = {"8080": str(port), "8081": str(grpc_port)}
    command = [str(artifact) if a == "/mnt/models" else a for a in container["command"]]
    args = [ports.get(a, a) for a in container["args"]] + model["args"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if "env" in model:  # the Secret KServe would read the token from
        assert model["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "token"
        env["MSERVE_TOKEN"] = TOKEN
    cli = [sys.executable, "-m", "mserve.cli.main"] + command[1:]
    return cli + args + ["--host", "127.0.0.1"], {**env, "MSERVE_DRAIN_TIMEOUT": "20"}


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
    err = shared.fail("export", "kserve", "kserve_tri", "--artifact", artifact)
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
