"""Compressed requests and answers through real workers, as Triton's clients send them:
tritonclient.http and .aio with ``request_compression_algorithm`` / ``response_compression_
algorithm`` (gzip and deflate, JSON and binary tensors), tritonclient.grpc and .aio with
``compression_algorithm``, answers checked against ONNX Runtime in-process; a curl-style gzip
body; and the limits: a gzip bomb gets 413 while the worker's memory stays flat, an unknown
coding 415, a corrupt stream 400."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from tests import models

pytestmark = pytest.mark.e2e
ROWS = 300  # answers well over the worker's MIN_COMPRESS, so they do come compressed
PACK = {"gzip": gzip.compress, "deflate": zlib.compress}
CASES = [(request, response, binary) for request in ("gzip", "deflate", None)
         for response in ("gzip", "deflate", None) for binary in (False, True)]


@pytest.fixture(scope="module")
def served(shared, model_dir):
    """``zmixed`` (two inputs of two dtypes, default 64 MiB limit) and ``zsmall`` (the same
    model with a 0.5 MiB limit): (name -> url, the model's path, zmixed's gRPC host:port)."""
    path = models.mixed(model_dir / "zmixed.onnx")
    zmixed = shared.json("deploy", path, "--name", "zmixed")["deployment"]
    urls = {"zmixed": zmixed["url"],
            "zsmall": shared.json("deploy", path, "--name", "zsmall",
                                  "--max-body-mb", "0.5")["deployment"]["url"]}
    yield urls, path, zmixed["grpc_url"]
    for name in urls:
        shared.run("undeploy", name)


@pytest.fixture(scope="module")
def expected(served):
    """Inputs and what ONNX Runtime answers for them, in-process."""
    rng = np.random.default_rng(18)
    a = rng.standard_normal((ROWS, 3)).astype(np.float32)
    b = rng.integers(-1000, 1000, (ROWS, 3)).astype(np.int64)
    session = ort.InferenceSession(str(served[1]), providers=["CPUExecutionProvider"])
    total, count = session.run(["sum", "count"], {"a": a, "b": b})
    return {"a": a, "b": b, "sum": total, "count": count}


def triton_io(module, data: dict, binary: bool | None = None):
    """``module``'s inputs and requested outputs; ``binary`` (HTTP only): binary tensors."""
    kw = {} if binary is None else {"binary_data": binary}
    inputs = [module.InferInput("a", [ROWS, 3], "FP32"), module.InferInput("b", [ROWS, 3], "INT64")]
    inputs[0].set_data_from_numpy(data["a"], **kw)
    inputs[1].set_data_from_numpy(data["b"], **kw)
    outputs = [module.InferRequestedOutput(name, **kw) for name in ("sum", "count")]
    return inputs, outputs


def check(result, data: dict) -> None:
    np.testing.assert_allclose(result.as_numpy("sum"), data["sum"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("count"), data["count"])


def test_tritonclient_http_compressed_infer(served, expected):
    client = triton.InferenceServerClient(served[0]["zmixed"].removeprefix("http://"))
    for request, response, binary in CASES:
        inputs, outputs = triton_io(triton, expected, binary)
        result = client.infer("zmixed", inputs, outputs=outputs,
                              request_compression_algorithm=request,
                              response_compression_algorithm=response)
        check(result, expected)
    client.close()


def test_tritonclient_http_aio_compressed_infer(served, expected):
    async def main():
        client = triton_aio.InferenceServerClient(served[0]["zmixed"].removeprefix("http://"))
        try:
            for request, response, binary in CASES:
                inputs, outputs = triton_io(triton_aio, expected, binary)
                result = await client.infer("zmixed", inputs, outputs=outputs,
                                            request_compression_algorithm=request,
                                            response_compression_algorithm=response)
                check(result, expected)
        finally:
            await client.close()

    asyncio.run(main())


def test_tritonclient_grpc_compressed_infer(served, expected):
    client = triton_grpc.InferenceServerClient(served[2])
    for coding in ("gzip", "deflate", None):
        inputs, outputs = triton_io(triton_grpc, expected)
        check(client.infer("zmixed", inputs, outputs=outputs, compression_algorithm=coding),
              expected)
    client.close()


def test_tritonclient_grpc_aio_compressed_infer(served, expected):
    async def main():
        client = triton_grpc_aio.InferenceServerClient(served[2])
        try:
            for coding in ("gzip", "deflate"):
                inputs, outputs = triton_io(triton_grpc_aio, expected)
                check(await client.infer("zmixed", inputs, outputs=outputs,
                                         compression_algorithm=coding), expected)
        finally:
            await client.close()

    asyncio.run(main())


def binary_request(data: dict) -> tuple[bytes, int]:
    """Triton's binary extension: (JSON header + raw tensors, the header's length)."""
    header = json.dumps({
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [ROWS, 3],
                    "parameters": {"binary_data_size": data["a"].nbytes}},
                   {"name": "b", "datatype": "INT64", "shape": [ROWS, 3],
                    "parameters": {"binary_data_size": data["b"].nbytes}}],
        "outputs": [{"name": "sum", "parameters": {"binary_data": True}},
                    {"name": "count", "parameters": {"binary_data": True}}]}).encode()
    return header + data["a"].tobytes() + data["b"].tobytes(), len(header)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_binary_header_length_counts_the_uncompressed_body_both_ways(served, expected, coding):
    body, header_length = binary_request(expected)
    r = httpx.post(served[0]["zmixed"] + "/v2/models/zmixed/infer", content=PACK[coding](body),
                   headers={"Content-Encoding": coding, "Accept-Encoding": coding,
                            "Inference-Header-Content-Length": str(header_length)})
    assert r.status_code == 200, r.text
    assert r.headers["content-encoding"] == coding
    assert r.num_bytes_downloaded < len(r.content)  # it came compressed; httpx inflated it
    length = int(r.headers["inference-header-content-length"])  # of the inflated answer
    header = json.loads(r.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    raw = r.content[length:]
    assert len(raw) == sum(sizes)
    np.testing.assert_allclose(np.frombuffer(raw[:sizes[0]], np.float32).reshape(ROWS, 3),
                               expected["sum"], rtol=1e-6)
    np.testing.assert_array_equal(np.frombuffer(raw[sizes[0]:], np.int64).reshape(ROWS, 3),
                                  expected["count"])


def test_curl_style_gzip_json_body(served, expected):
    """As ``curl --data-binary @request.json.gz -H 'Content-Encoding: gzip' --compressed``."""
    doc = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [ROWS, 3],
                       "data": expected["a"].tolist()},
                      {"name": "b", "datatype": "INT64", "shape": [ROWS, 3],
                       "data": expected["b"].tolist()}]}
    r = httpx.post(served[0]["zmixed"] + "/v2/models/zmixed/infer",
                   content=gzip.compress(json.dumps(doc).encode()),
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.headers["content-encoding"] == "gzip"  # httpx accepts gzip by default
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    np.testing.assert_allclose(np.reshape(outputs["sum"], (ROWS, 3)), expected["sum"], rtol=1e-6)
    np.testing.assert_array_equal(np.reshape(outputs["count"], (ROWS, 3)), expected["count"])


def rss_kib(shared, name: str) -> int:
    pid = shared.deployment(name)["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def bomb_rss_growth(shared, url: str, name: str, bomb: bytes, times: int) -> int:
    """Send ``bomb`` ``times`` times (after two to warm up): each gets 413; RSS growth, KiB."""
    with httpx.Client(timeout=60) as client:
        def send():
            r = client.post(f"{url}/v2/models/{name}/infer", content=bomb,
                            headers={"Content-Encoding": "gzip"})
            assert r.status_code == 413, r.text
            assert "once decompressed" in r.json()["error"]

        send(), send()
        before = rss_kib(shared, name)
        for _ in range(times):
            send()
        assert client.get(f"{url}/v2/health/ready").status_code == 200
    return rss_kib(shared, name) - before


def test_a_one_kib_gzip_bomb_gets_413_and_memory_stays_flat(shared, served):
    bomb = gzip.compress(b"\0" * 2**20, 9)  # 1 MiB of zeros, twice the 0.5 MiB limit
    assert len(bomb) < 1100
    assert bomb_rss_growth(shared, served[0]["zsmall"], "zsmall", bomb, times=20) < 4096


def test_a_bomb_past_the_default_limit_never_inflates_past_it(shared, served):
    bomb = gzip.compress(b"\0" * (65 * 2**20), 9)  # 65 KiB that would inflate to 65 MiB
    assert len(bomb) < 70_000
    assert bomb_rss_growth(shared, served[0]["zmixed"], "zmixed", bomb, times=8) < 8192


@pytest.mark.parametrize("coding, body, status, words", [
    ("br", b"\x0b\x00\x80", 415, "'br' is not supported"),
    ("gzip", b"plain text, not gzip", 400, "not valid gzip"),
    ("deflate", zlib.compress(b'{"inputs": []}')[:-3], 400, "truncated")],
    ids=["unknown-coding", "corrupt-gzip", "truncated-deflate"])
def test_unknown_codings_and_corrupt_streams_are_refused(served, coding, body, status, words):
    url = served[0]["zmixed"]
    r = httpx.post(url + "/v2/models/zmixed/infer", content=body,
                   headers={"Content-Encoding": coding})
    assert r.status_code == status and words in r.json()["error"], r.text
    assert httpx.get(url + "/v2/models/zmixed/ready").status_code == 200
