"""The real peers: NVIDIA Triton (through PyTriton) and Seldon MLServer, each in its own venv
beside bench/.venv (bench/.venv-triton, bench/.venv-mlserver), installed lazily, once per set of
requirements (a stamp file records the set; a failed install is recorded too, with its
reason, and retried only when the set changes or the venv is deleted), and run as server
subprocesses on free ports. A peer that cannot install or start is reported n/a, with why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cost
import servers

BENCH = Path(__file__).parent
PIP_TIMEOUT = 600.0
TRITON_DELAY_US = 100  # as bench/triton_server.py
MLSERVER_BATCH, MLSERVER_DELAY_S = 64, 0.0001
SETTINGS = {
    "triton": (f"PyTriton {{version}} (tritonserver C++ HTTP/gRPC front ends, Python backend): "
               f"dynamic batching `max_batch_size=64`, `max_queue_delay_microseconds="
               f"{TRITON_DELAY_US}`, one model instance, `@batch` function running the ORT "
               "session in the PyTriton process; defaults otherwise (bench/triton_server.py)"),
    "mlserver": (f"MLServer {{version}}: custom `MLModel` runtime (bench/mlserver_runtime.py), "
                 f"adaptive batching `max_batch_size={MLSERVER_BATCH}`, `max_batch_time="
                 f"{MLSERVER_DELAY_S}` s, `parallel_workers={{workers}}` (one per core), "
                 "defaults otherwise"),
}


def _requirements(peer: str) -> list[str]:
    """What each peer's venv needs. PyTriton requires numpy<2, so its venv cannot have the
    project's numpy; onnxruntime is the project's version everywhere."""
    ort = [p for p in servers.project_pins() if p.startswith("onnxruntime")]
    if peer == "triton":
        return ["nvidia-pytriton>=0.7,<0.8", *ort, "numpy<2"]
    return ["mlserver>=1.7,<1.8", "uvloop<0.22", *servers.project_pins()]


@dataclass
class PeerVenv:
    """One peer's venv: its python, or why it is unusable."""

    name: str
    python: Path
    error: str | None = None

    @property
    def bin(self) -> Path:
        return self.python.parent

    def version(self, dist: str) -> str:
        done = subprocess.run([str(self.python), "-c", "import sys; from importlib import "
                               f"metadata; print(metadata.version({dist!r}))"],
                              check=False, capture_output=True, text=True)
        return done.stdout.strip() or "?"


def ensure_peer(peer: str) -> PeerVenv:
    """bench/.venv-PEER with its requirements installed (once per set), or why not."""
    venv = BENCH / f".venv-{peer}"
    python, stamp, failed = venv / "bin" / "python", venv / ".bench-requirements", \
        venv / ".bench-install-failed"
    wanted = _requirements(peer)
    key = hashlib.sha256(json.dumps(wanted).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == key:
        return PeerVenv(peer, python)
    if failed.exists() and failed.read_text().split("\n", 1)[0] == key:
        return PeerVenv(peer, python, failed.read_text().split("\n", 1)[1])
    print(f"installing {' '.join(wanted)} into bench/.venv-{peer} (once) ...", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True)
        error = servers._pip(*wanted, python=python, timeout=PIP_TIMEOUT)
    except (OSError, subprocess.CalledProcessError) as exc:
        error = f"cannot create the venv: {exc}"
    if error:
        error = f"{peer} did not install: {error}"
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{key}\n{error}")
        return PeerVenv(peer, python, error)
    stamp.write_text(key)
    failed.unlink(missing_ok=True)
    return PeerVenv(peer, python)


class Peer(servers.Server):
    """A peer server: HTTP on ``url``, gRPC on ``grpc``, Prometheus metrics on
    ``metrics_url``; started and stopped like the other contenders (process group)."""

    grpc: str
    metrics_url: str

    def batches(self, model: str):
        raise NotImplementedError

    def failures(self, model: str) -> float:
        raise NotImplementedError


class Triton(Peer):
    """bench/triton_server.py in bench/.venv-triton."""

    def __init__(self, venv: PeerVenv, model: Path, name: str, logdir: Path, work: Path):
        super().__init__("triton_server.py", model, name, "/v2/models/{name}/ready", logdir)
        grpc_port, metrics_port = servers.free_port(), servers.free_port()
        workspace = work / f"pytriton-{name}"  # PyTriton's own is left behind on SIGTERM
        shutil.rmtree(workspace, ignore_errors=True)
        self.cmd = [str(venv.python), str(BENCH / "triton_server.py"), str(model), name,
                    str(self.port), str(grpc_port), str(metrics_port), str(workspace)]
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        # The Python backend stub links libpython: make it load the venv interpreter's own,
        # not another Python's from the system library path.
        libdir = subprocess.run([str(venv.python), "-c", "import sysconfig; print(sysconfig."
                                 "get_config_var('LIBDIR'))"], check=True, capture_output=True,
                                text=True).stdout.strip()
        old = os.environ.get("LD_LIBRARY_PATH")
        self.env = {**os.environ, "LD_LIBRARY_PATH": libdir + (f":{old}" if old else "")}
        self.timeout = 180.0

    def batches(self, model: str):
        return cost.triton_batches(self.metrics_url, model)

    def failures(self, model: str) -> float:
        """Failed requests, less those cancelled by the client (h2load resets the calls in
        flight when its run ends; mserve counts those apart, as "cancelled", too)."""
        series = cost.metrics(self.metrics_url)
        return cost.total(series, "nv_inference_request_failure", model) - sum(
            v for k, v in series.items()
            if k.startswith("nv_inference_request_failure{") and 'reason="CANCELED"' in k
            and f'model="{model}"' in k)


class MLServer(Peer):
    """``mlserver start`` on a folder with settings.json and NAME/model-settings.json."""

    def __init__(self, venv: PeerVenv, model: Path, name: str, logdir: Path, work: Path):
        super().__init__("mlserver_runtime.py", model, name, "/v2/models/{name}/ready", logdir)
        self.log = logdir / f"mlserver-{name}.log"
        grpc_port, metrics_port = servers.free_port(), servers.free_port()
        folder = work / f"mlserver-{name}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        self.workers = os.cpu_count() or 1
        (folder / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.port, "grpc_port": grpc_port,
            "metrics_port": metrics_port, "parallel_workers": self.workers,
            "metrics_dir": str(folder / ".metrics")}))  # not the current folder
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.OnnxRuntime",
            "parameters": {"uri": str(model.resolve())},
            "max_batch_size": MLSERVER_BATCH, "max_batch_time": MLSERVER_DELAY_S}))
        self.cmd = [str(venv.bin / "mlserver"), "start", str(folder)]
        self.env = {**os.environ, "PYTHONPATH": str(BENCH)}
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.timeout = 180.0

    def batches(self, model: str):
        return cost.mlserver_batches(self.metrics_url, model)

    def failures(self, model: str) -> float:
        return cost.total(cost.metrics(self.metrics_url), "model_infer_request_failure_total",
                          model)


def settings(peer: str, venv: PeerVenv) -> str:
    """The legend line for ``peer``'s rows."""
    dist = "nvidia-pytriton" if peer == "triton" else "mlserver"
    version = venv.version(dist) if not venv.error else "?"
    return SETTINGS[peer].format(version=version, workers=os.cpu_count() or 1)
