"""gRPC load with h2load (nghttp2's HTTP/2 load generator, written in C).

A unary gRPC call is an HTTP/2 POST to ``/inference.GRPCInferenceService/ModelInfer`` with
``content-type: application/grpc``, ``te: trailers`` and the message framed as one byte of
flags, four bytes of length and the protobuf. h2load sends that body on each stream, so it
drives mserve's gRPC service the way ghz would (ghz does not install from this machine's
registries; h2load is the Debian package nghttp2-client). One connection per concurrent
call (``-c C -m 1``), closed loop, like the wrk rows.

h2load sees HTTP statuses, not gRPC ones (a failed call is HTTP 200 with a non-zero
``grpc-status`` trailer), so before the load one call is checked with a real gRPC client
(numbers compared with numpy), and the server's own failure counter
(``mserve_requests_total{outcome="failure"}``) is read before and after each run: its
increase is added to h2load's failed streams as the row's errors.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen import LoadgenError, apt_install
from payloads import mismatch

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class GrpcResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    requests: int = 0  # calls answered with HTTP 200


def ensure_h2load() -> str:
    """Path of h2load; installs Debian's nghttp2-client when missing and running as root."""
    return shutil.which("h2load") or apt_install("nghttp2-client", "h2load")


def request_message(model: str, x: np.ndarray) -> bytes:
    """A serialized ModelInferRequest with ``x`` as input ``x`` in raw_input_contents."""
    from mserve.daemon.protocol.proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request.SerializeToString()


def frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def check_answer(target: str, message: bytes, expected: np.ndarray) -> str | None:
    """One call with grpcio; None when the answer matches ``expected``, else what is wrong."""
    import grpc

    from mserve.daemon.protocol.proto import grpc_service_pb2 as pb

    try:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(METHOD, request_serializer=None,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            response = call(message, timeout=30)
    except grpc.RpcError as exc:
        return f"gRPC {exc.code().name}: {exc.details()}"
    shape = tuple(response.outputs[0].shape)
    if response.raw_output_contents:
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)
    else:  # typed contents (MLServer answers this way)
        got = np.asarray(response.outputs[0].contents.fp32_contents, dtype=np.float32)
        got = got.reshape(shape)
    return mismatch(got, expected)


def server_failures(metrics_url: str) -> float:
    """mserve's count of failed inference requests (all versions and codes)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mserve_requests_total{") and 'outcome="failure"' in line)


def run_h2load(h2load: str, target: str, body: Path, connections: int, seconds: float,
               failures=None) -> GrpcResult:
    """``seconds`` of closed-loop unary calls on ``connections`` connections (with
    ``failures``, a function reading the server's count of failed calls, the failures during
    the run count as errors)."""
    before = failures() if failures else 0
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.tsv"
        cmd = [h2load, "-D", f"{seconds:g}", "-c", str(connections), "-m", "1", "-t",
               str(1 if connections == 1 else 2), "-H", "content-type: application/grpc",
               "-H", "te: trailers", "-d", str(body), f"--log-file={log}",
               f"http://{target}{METHOD}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0:
            raise LoadgenError(f"h2load failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        durations = _durations_ms(log)
    failed = _failed(done.stdout)
    errors = failed + (int(failures() - before) if failures else 0)
    if not len(durations):
        raise LoadgenError(f"h2load completed no call:\n{done.stdout[-1000:]}")
    return GrpcResult(rps=len(durations) / seconds,
                      p50_ms=float(np.percentile(durations, 50)),
                      p99_ms=float(np.percentile(durations, 99)), errors=errors,
                      requests=len(durations))


def _durations_ms(log: Path) -> np.ndarray:
    """Response times of the successful streams in h2load's per-request log (start µs,
    status, duration µs)."""
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    return np.array([int(r[2]) / 1000 for r in rows if r[1] == "200"], dtype=float)


def _failed(out: str) -> int:
    """failed + errored + timeout streams from h2load's 'requests:' line."""
    for line in out.splitlines():
        if line.startswith("requests:"):
            words = line.replace(",", "").split()
            return sum(int(words[i - 1]) for i, w in enumerate(words)
                       if w in ("failed", "errored", "timeout"))
    raise LoadgenError(f"unreadable h2load output:\n{out[-1000:]}")


class Floor:
    """bench/grpc_floor.py on a free port, answering ``expected`` for ``model``, as a context
    manager: ``target`` (host:port) and ``pid`` while it runs."""

    def __init__(self, model: str, expected: np.ndarray, work: Path):
        from mserve.daemon.protocol.proto import grpc_service_pb2 as pb

        answer = pb.ModelInferResponse(model_name=model, model_version="1")
        answer.outputs.add(name="y", datatype="FP32", shape=list(expected.shape))
        answer.raw_output_contents.append(expected.astype("<f4").tobytes())
        self.answer_file = work / f"{model}.floor-answer"
        self.answer_file.write_bytes(answer.SerializeToString())
        self.proc: subprocess.Popen | None = None
        self.target = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> Floor:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "grpc_floor.py"), str(port),
             str(self.answer_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "ready", or EOF when it failed
        if line.strip() != "ready":
            self.__exit__()
            raise LoadgenError(f"the gRPC floor server did not start: {line.strip()}")
        self.target = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
