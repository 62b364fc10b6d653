"""The serving image, built and run for real: `make image-offline` (../shared/tools/
container-image: podman on a locally made base, for machines that reach no registry) or, without
that tool, `make image` with podman or docker. `mserve serve` in the container answers HTTP and
gRPC from the host; SIGTERM (a container stop) turns readiness off, serves on through the grace,
then drains and exits 0, refusing nothing that was routed to it before readiness turned off;
and the image runs as an arbitrary uid on a read-only root filesystem.

Slow (a first build is ~1 min, later ones seconds); skipped only where no container tool is
installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import models
from tests.conftest import wait_for
from tests.test_e2e_serve import AFFINE_BODY, Routed, free_ports, grpc_health, refuses

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TOOL = Path(os.environ.get("MSERVE_CONTAINER_IMAGE_TOOL",
                           ROOT.parent / "shared" / "tools" / "container-image"))
IMAGE = "localhost/mserve:e2e"
# What podman or docker say when the base image is not local and no registry answers.
UNREACHABLE = re.compile(r"pinging container registry|no such host|Temporary failure in name "
                         r"resolution|dial tcp|connection refused|i/o timeout|TLS handshake")


def working_engine() -> str | None:
    """podman, or docker with a daemon that answers."""
    for engine in ("podman", "docker"):
        if shutil.which(engine) and subprocess.run(
                [engine, "info"], capture_output=True, timeout=60).returncode == 0:
            return engine
    return None


class Engine:
    """Build, run and stop the image: with the offline tool when it is here (it needs root),
    else with plain podman/docker."""

    def __init__(self):
        self.tool = TOOL if TOOL.is_file() and os.access(TOOL, os.X_OK) \
            and os.geteuid() == 0 else None
        self.engine = None if self.tool else working_engine()
        if self.tool is None and self.engine is None:
            pytest.skip(f"no container tool: neither {TOOL} (as root) nor a working podman or "
                        "docker is installed")

    def build(self) -> float:
        target = ["image-offline"] if self.tool else ["image", f"CONTAINER={self.engine}"]
        started = time.monotonic()
        done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *target,
                               f"IMAGE={IMAGE}", f"CONTAINER_IMAGE_TOOL={self.tool}"],
                              capture_output=True, text=True, timeout=600)
        out = done.stdout[-3000:] + done.stderr[-3000:]
        if done.returncode != 0 and self.engine and UNREACHABLE.search(out):
            pytest.skip(f"{self.engine} cannot pull the base image (no registry reachable) and "
                        f"the offline tool {TOOL} is not here")
        assert done.returncode == 0, out
        return time.monotonic() - started

    def run(self, model: Path, options: list[str], args: list[str]) -> str:
        if self.tool:
            command = [str(self.tool), "run", IMAGE, "--model", str(model), *options, "--",
                       *args]
        else:
            command = [self.engine, "run", "-d", "--network", "host", "-v",
                       f"{model}:/mnt/models:ro", *options, IMAGE, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip().splitlines()[-1]

    def stop(self, container: str) -> int:
        """SIGTERM, wait for the exit, remove; the exit code."""
        if self.tool:
            done = subprocess.run([str(self.tool), "stop", container], capture_output=True,
                                  text=True, timeout=120)
            said = re.search(r"\(exit code (\d+)\)", done.stdout + done.stderr)
            assert said, done.stdout + done.stderr
            return int(said[1])
        subprocess.run([self.engine, "stop", "-t", "30", container], capture_output=True,
                       timeout=120, check=True)
        code = subprocess.run([self.engine, "inspect", "-f", "{{.State.ExitCode}}", container],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        subprocess.run([self.engine, "rm", "-f", container], capture_output=True, timeout=60)
        return int(code.strip())

    def logs(self, container: str) -> str:
        command = [str(self.tool), "logs", container] if self.tool \
            else [self.engine, "logs", container]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def remove(self, container: str) -> None:
        command = [str(self.tool), "podman"] if self.tool else [self.engine]
        subprocess.run([*command, "rm", "-f", "-t", "0", container], capture_output=True,
                       timeout=60)


@pytest.fixture(scope="module")
def engine():
    engine = Engine()
    seconds = engine.build()
    print(f"image {IMAGE} built in {seconds:.0f} s", file=sys.stderr)
    return engine


@pytest.fixture
def container(engine, tmp_path):
    """Start the image on a model folder: (url, grpc port, id); removed at the end."""
    started = []
    model = models.affine(tmp_path / "affine" / "model.onnx", scale=2.0, bias=1.0)
    model.parent.chmod(0o755)
    model.chmod(0o644)  # readable by whatever uid the container runs as

    def start(*options: str):
        port, grpc_port = free_ports(2)
        cid = engine.run(model.parent, list(options),
                         ["--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                          str(grpc_port), "--name", "affine"])
        started.append(cid)
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what=f"the container to be ready: {engine.logs(cid)}")
        return url, grpc_port, cid

    yield start
    for cid in started:
        engine.remove(cid)


def predict_both_ways(url: str, grpc_port: int) -> None:
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    http = triton_http.InferenceServerClient(url.removeprefix("http://"))
    assert http.is_server_ready()
    inp = triton_http.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_allclose(http.infer("affine", [inp]).as_numpy("y"), x * 2 + 1)
    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inp = triton_grpc.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer("affine", [inp]).as_numpy("y"), x * 2 + 1)
    grpc.close()


def test_the_image_serves_and_drains_losing_nothing_routed(engine, container):
    from mserve.daemon.protocol.proto import health_pb2

    url, grpc_port, cid = container()
    predict_both_ways(url, grpc_port)
    assert grpc_health(grpc_port) == health_pb2.HealthCheckResponse.SERVING
    port = int(url.rpartition(":")[2])
    with Routed(url, "/v2/models/affine/infer", AFFINE_BODY) as traffic:
        stopped = {}
        stopping = threading.Thread(target=lambda: stopped.update(code=engine.stop(cid)))
        sigterm = time.monotonic()
        stopping.start()
        traffic.wait_unrouted()
        # within the image's grace (MSERVE_DRAIN_GRACE=5): not ready, live, still serving
        assert time.monotonic() - sigterm < 5
        assert httpx.get(url + "/v2/health/ready").status_code == 503
        assert httpx.get(url + "/v2/health/live").status_code == 200
        assert httpx.post(url + "/v2/models/affine/infer", json=AFFINE_BODY).status_code == 200
        assert grpc_health(grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert traffic.refused == [], (f"{len(traffic.refused)} of {traffic.sent} routed requests "
                                   f"refused: {traffic.refused[:3]}")
    assert traffic.ok > 20
    print(f"container stop: {traffic.ok} of {traffic.sent} routed requests answered 200",
          file=sys.stderr)
    wait_for(lambda: refuses(port), timeout=20, what="the port to close")
    assert time.monotonic() - sigterm >= 4.8
    stopping.join(timeout=60)
    assert stopped == {"code": 0}


def test_the_image_runs_as_any_uid_on_a_read_only_root(container, engine):
    url, grpc_port, cid = container("--user", "12345", "--read-only")
    predict_both_ways(url, grpc_port)
    assert engine.stop(cid) == 0


def test_the_dockerfile_pulls_only_its_one_base_and_no_frontend():
    """Runs without any container tool. A `# syntax=` line makes BuildKit fetch a frontend
    image (no offline build); a stage chosen through an ARG (`FROM base-${VARIANT}`) makes
    Docker's classic builder pull every base and buildah 1.28 fail ("base-cpu: image not
    known"). Every FROM is the one BASE or a stage named before it."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert not [line for line in lines if re.match(r"#\s*syntax\s*=", line)]
    stages = set()
    for line in lines:
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.IGNORECASE):
            assert m[1] == "${BASE}" or m[1] in stages, line
            stages.add(m[2])
    assert re.search(r"^ARG BASE=python:3\.12-slim-bookworm$", "\n".join(lines), re.MULTILINE)
