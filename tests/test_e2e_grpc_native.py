"""The worker's own HTTP/2 gRPC front end (daemon/worker/h2.py, grpc_native.py), through the
real daemon and worker, with grpcio's and NVIDIA's clients and with raw HTTP/2 bytes: what a
hand-written transport could get wrong (a header cache answering stale metadata, deadlines,
cancels, batching of calls read together, bad peers), and the grpcio fallback."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2

from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
SERVICE = "/inference.GRPCInferenceService/"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def native(shared, model_dir):
    d = shared.json("deploy", models.affine(model_dir / "native" / "a.onnx", scale=2.0),
                    "--name", "gnative")["deployment"]
    yield d
    shared.ok("undeploy", "gnative")


def infer_request(x: np.ndarray, model: str = "gnative") -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request.SerializeToString()


def answer_of(raw: bytes) -> np.ndarray:
    response = service_pb2.ModelInferResponse.FromString(raw)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
        tuple(response.outputs[0].shape))


def test_per_call_metadata_is_never_served_from_a_stale_header_cache(native, shared):
    """Every call on one connection carries its own request id (a literal the client
    indexes, then references): each lands in the request log under its own id."""
    with grpc.insecure_channel(native["grpc_url"]) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer")
        for i in range(40):
            x = np.full((1, 4), i, np.float32)
            raw = infer(infer_request(x), metadata=(("x-request-id", f"native-{i % 20}-{i}"),))
            assert answer_of(raw).tolist() == (x * 2).tolist()
    log = shared.home / "logs" / "gnative.requests.jsonl"

    def ids():
        return [e["id"] for e in map(json.loads, log.read_text().splitlines())
                if e["id"].startswith("native-")]

    wait_for(lambda: len(ids()) >= 40, what="the request log")
    assert ids() == [f"native-{i % 20}-{i}" for i in range(40)]


def test_concurrent_calls_batch_and_every_answer_is_its_own(native):
    """Calls that arrive together share model runs (the front end counts them before their
    tasks start), and each gets the rows of its own request."""
    metrics = native["url"] + "/metrics"

    def batch_counts():
        text = httpx.get(metrics).text
        pick = lambda key: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith(key) and 'model="gnative"' in line)
        return pick("mserve_batch_size_sum"), pick("mserve_batch_size_count")

    before = batch_counts()
    with grpc.insecure_channel(native["grpc_url"]) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer")
        inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(400)]
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda x: answer_of(infer(infer_request(x))), inputs))
    assert all(a.tolist() == (x * 2).tolist() for a, x in zip(answers, inputs))
    after = batch_counts()
    requests, runs = after[0] - before[0], after[1] - before[1]
    assert requests == 400 and runs < requests, (requests, runs)


def test_a_deadline_ends_the_call_and_a_cancel_is_recorded(shared, model_dir):
    d = shared.json("deploy", models.slow(model_dir / "native-slow" / "slow.onnx"),
                    "--name", "gslow")["deployment"]
    request = service_pb2.ModelInferRequest(model_name="gslow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="n", datatype="INT64", shape=[])
    request.raw_input_contents.extend([np.zeros((1, 4), "<f4").tobytes(),
                                       np.array(3_000_000, "<i8").tobytes()])
    with grpc.insecure_channel(d["grpc_url"]) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            infer(request.SerializeToString(), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        future = infer.future(request.SerializeToString(),
                              metadata=(("x-request-id", "native-cancelled"),))
        time.sleep(0.2)
        future.cancel()
        # the worker still answers afterwards
        assert channel.unary_unary(SERVICE + "ServerLive")(b"", timeout=5) == b"\x08\x01"
    log = shared.home / "logs" / "gslow.requests.jsonl"
    entry = wait_for(lambda: next((e for e in map(json.loads, log.read_text().splitlines())
                                   if e["id"] == "native-cancelled"), None),
                     timeout=30, what="the cancelled call in the request log")
    assert entry["status"] == 499
    shared.ok("undeploy", "gslow")


def test_unknown_methods_and_non_grpc_requests_get_their_status(native):
    with grpc.insecure_channel(native["grpc_url"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/no.Such/Method")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status = _raw_h2_request(native["grpc_url"], b"application/json")
    assert status == 415


def test_garbage_and_silent_peers_harm_nothing(native):
    host, port = native["grpc_url"].rsplit(":", 1)
    with socket.create_connection((host, int(port))):  # a peer that never sends its preface
        _garbage_peers(native, host, port)


def _garbage_peers(native, host, port):
    with socket.create_connection((host, int(port))) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        bad.settimeout(5)
        assert _goaway_code(_read_until_closed(bad)) == 0x1  # PROTOCOL_ERROR, then closed
    with socket.create_connection((host, int(port))) as bad:
        bad.sendall(PREFACE + struct.pack(">I", 2**24 - 1)[1:] + b"\x00\x00\x00\x00\x00\x01")
        bad.settimeout(5)
        assert _goaway_code(_read_until_closed(bad)) == 0x6  # FRAME_SIZE_ERROR: too large
    client = tg.InferenceServerClient(native["grpc_url"])
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("gnative", [x]).as_numpy("y").tolist() == [[2.0] * 4]
    client.close()
    # and grpcio's core never started in the worker: the front end is the worker's own
    assert not {"event_engine", "grpc_global_tim"} & set(_thread_names(native["pid"]))


def test_a_rapid_reset_peer_is_sent_away_and_others_are_served(native):
    """Streams opened and reset at once, thousands of times (CVE-2023-44487's attack): the
    connection gets GOAWAY ENHANCE_YOUR_CALM; other clients go on being served."""
    def literal(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value

    block = (b"\x83\x86" + literal(b":path", SERVICE.encode() + b"ModelInfer")
             + literal(b":authority", b"x") + literal(b"content-type", b"application/grpc"))
    flood = bytearray(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    for stream in range(1, 2 * 5000, 2):
        flood += struct.pack(">I", len(block))[1:] + b"\x01\x04" + struct.pack(">I", stream)
        flood += block + b"\x00\x00\x04\x03\x00" + struct.pack(">II", stream, 8)
    host, port = native["grpc_url"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(10)
        try:
            sock.sendall(flood)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-flood: what we want
        answer = _read_until_closed(sock)
    assert _goaway_code(answer) == 0xB  # ENHANCE_YOUR_CALM
    with grpc.insecure_channel(native["grpc_url"]) as channel:
        raw = channel.unary_unary(SERVICE + "ModelInfer")(
            infer_request(np.ones((1, 4), np.float32)), timeout=10)
    assert answer_of(raw).tolist() == [[2.0] * 4]


def test_the_grpcio_front_end_is_a_setting_away(mserve, model_dir):
    env = {"MSERVE_GRPC_FRONTEND": "grpcio"}
    mserve.env.update(env)
    d = mserve.json("deploy", models.affine(model_dir / "native-fallback" / "a.onnx"),
                    "--name", "gold")["deployment"]
    assert b"MSERVE_GRPC_FRONTEND=grpcio" in Path(f"/proc/{d['pid']}/environ").read_bytes()
    assert "grpc_global_tim" in _thread_names(d["pid"])  # grpcio's core runs in it
    with grpc.insecure_channel(d["grpc_url"]) as channel:
        raw = channel.unary_unary(SERVICE + "ModelInfer")(
            infer_request(np.ones((1, 4), np.float32), "gold"), timeout=10)
    assert answer_of(raw).tolist() == [[1.0] * 4]


def test_a_connection_that_never_speaks_is_closed(mserve, model_dir):
    mserve.env["MSERVE_GRPC_PREFACE_TIMEOUT"] = "0.5"
    d = mserve.json("deploy", models.affine(model_dir / "native-silent" / "a.onnx"),
                    "--name", "gsilent")["deployment"]
    host, port = d["grpc_url"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as silent:
        silent.settimeout(10)
        started = time.monotonic()
        assert silent.recv(65536)  # our SETTINGS
        _read_until_closed(silent)
        assert time.monotonic() - started < 5


def _goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in ``data`` (frames from the start)."""
    pos = 0
    while len(data) - pos >= 9:
        length, kind = int.from_bytes(data[pos:pos + 3], "big"), data[pos + 3]
        if kind == 7:
            return int.from_bytes(data[pos + 13:pos + 17], "big")
        pos += 9 + length
    return None


def _thread_names(pid: int) -> list[str]:
    return sorted(Path(path, "comm").read_text().strip()
                  for path in Path(f"/proc/{pid}/task").iterdir())


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _raw_h2_request(target: str, content_type: bytes) -> int:
    """One HTTP/2 POST written by hand (HPACK literals, no table): the answer's :status."""
    def literal(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value

    block = (b"\x83\x86" + literal(b":path", SERVICE.encode() + b"ModelInfer")
             + literal(b":authority", b"x") + literal(b"content-type", content_type))
    headers = struct.pack(">I", len(block))[1:] + b"\x01\x05\x00\x00\x00\x01" + block
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + headers)
        sock.settimeout(5)
        data = b""
        while True:
            data += sock.recv(65536)
            pos = 0
            while len(data) - pos >= 9:
                length = int.from_bytes(data[pos:pos + 3], "big")
                kind, stream = data[pos + 3], int.from_bytes(data[pos + 5:pos + 9], "big")
                payload = data[pos + 9:pos + 9 + length]
                if kind == 1 and stream == 1:
                    from hpack import Decoder
                    return int(dict(Decoder().decode(payload))[":status"])
                pos += 9 + length
