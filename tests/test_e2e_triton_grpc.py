"""Triton's gRPC extensions through real workers, with NVIDIA's own clients (tritonclient.grpc
and tritonclient.grpc.aio): model configuration (pinned versions too), repository index and
the refused load/unload, bidirectional streaming inference (order, ids, errors that leave the
stream open, token, accounting), and the standard grpc.health.v1 service (no token; SERVING,
then NOT_SERVING while an undeploy drains)."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mserve.daemon.protocol.proto import health_pb2, health_pb2_grpc
from tests import models
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e
STREAMED = 32
MANAGED = "mserve manages versions itself: use 'mserve deploy' / 'mserve rollback'"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def served(shared, model_dir, affine_v1, affine_v2):
    """tgaff: version 1 batched (auto), version 2 deployed with --batching off; tgmix: two
    inputs of two datatypes, for streaming."""
    mixed = models.mixed(model_dir / "tgmix.onnx")
    served = {"tgaff": shared.json("deploy", affine_v1, "--name", "tgaff")["deployment"],
              "tgmix": shared.json("deploy", mixed, "--name", "tgmix")["deployment"]}
    served["tgaff"] = shared.json("deploy", affine_v2, "--name", "tgaff", "--batching",
                                  "off")["deployment"]
    served["tgmix"]["path"] = mixed
    yield served
    for name in served:
        shared.run("undeploy", name)


def mixed_inputs(rows: int, seed: int) -> tuple[list[tg.InferInput], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = {"a": rng.standard_normal((rows, 3)).astype(np.float32),
             "b": rng.integers(-1000, 1000, (rows, 3)).astype(np.int64)}
    inputs = [tg.InferInput("a", [rows, 3], "FP32"), tg.InferInput("b", [rows, 3], "INT64")]
    inputs[0].set_data_from_numpy(feeds["a"])
    inputs[1].set_data_from_numpy(feeds["b"])
    return inputs, feeds


def expected_outputs(path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["sum", "count"], session.run(["sum", "count"], feeds)))


def successes(d: dict, name: str) -> int:
    stats = httpx.get(f"{d['url']}/v2/models/{name}/stats").json()["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def counted(d: dict, outcome: str) -> float:
    """mserve_requests_total of one outcome, whatever other labels the series carry."""
    text = httpx.get(d["url"] + "/metrics").text
    pattern = rf'^mserve_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def logged(shared, name: str, prefix: str) -> dict[str, dict]:
    log = shared.home / "logs" / f"{name}.requests.jsonl"
    entries = map(json.loads, log.read_text().splitlines()) if log.exists() else ()
    return {e["id"]: e for e in entries if e["id"].startswith(prefix)}


# ---------------------------------------------------------------- model configuration


def test_model_config_in_tritons_shape(served):
    d = served["tgaff"]
    kind = "KIND_GPU" if d["device"] == "cuda" else "KIND_CPU"
    c = tg.InferenceServerClient(d["grpc_url"])
    config = c.get_model_config("tgaff").config
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert (config.name, config.platform, config.backend) == \
        ("tgaff", "onnxruntime_onnx", "onnxruntime")
    assert list(config.version_policy.specific.versions) == [1, 2]
    unbatched = c.get_model_config("tgaff", as_json=True)["config"]  # the active one: v2
    assert unbatched.get("max_batch_size", 0) == 0 and "dynamic_batching" not in unbatched
    assert [(i["name"], i["data_type"], i["dims"]) for i in unbatched["input"]] == \
        [("x", "TYPE_FP32", ["-1", "4"])]
    assert unbatched["instance_group"][0]["kind"] == kind
    batched = c.get_model_config("tgaff", "1", as_json=True)["config"]  # pinned
    assert batched["max_batch_size"] == 64 and "dynamic_batching" in batched
    assert [(o["name"], o["data_type"], o["dims"]) for o in batched["output"]] == \
        [("y", "TYPE_FP32", ["4"])]
    for version, code in (("7", "StatusCode.NOT_FOUND"), ("x", "StatusCode.NOT_FOUND")):
        with pytest.raises(InferenceServerException) as info:
            c.get_model_config("tgaff", version)
        assert info.value.status() == code
    with pytest.raises(InferenceServerException) as info:
        c.get_model_config("other")
    assert info.value.message() == "model 'other' not found; this port serves 'tgaff'"
    c.close()


def test_model_config_over_aio(served):
    async def configs():
        async with tga.InferenceServerClient(served["tgaff"]["grpc_url"]) as c:
            return (await c.get_model_config("tgaff"),
                    await c.get_model_config("tgaff", "1", as_json=True))

    active, pinned = asyncio.run(configs())
    assert active.config.name == "tgaff" and active.config.max_batch_size == 0
    assert pinned["config"]["max_batch_size"] == 64


def test_model_config_is_the_http_one(served):
    """The same document over both protocols, field for field (tritonclient's message)."""
    d = served["tgaff"]
    c = tg.InferenceServerClient(d["grpc_url"])
    for version in ("", "1", "2"):
        path = f"/versions/{version}" if version else ""
        http = httpx.get(f"{d['url']}/v2/models/tgaff{path}/config")
        assert http.status_code == 200, http.text
        assert json_format.ParseDict(http.json(), model_config_pb2.ModelConfig()) == \
            c.get_model_config("tgaff", version).config, version
    c.close()


# ---------------------------------------------------------------- model repository


def test_repository_index_and_refused_load_unload(served):
    d = served["tgaff"]
    c = tg.InferenceServerClient(d["grpc_url"])
    index = c.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in index] == \
        [("tgaff", "1", "READY"), ("tgaff", "2", "READY")]
    channel = grpc.insecure_channel(d["grpc_url"])
    rpc = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    ready = rpc.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert [m.version for m in ready.models] == ["1", "2"]
    channel.close()
    for change in (c.load_model, c.unload_model):
        with pytest.raises(InferenceServerException) as info:
            change("tgaff")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert info.value.message() == MANAGED
    c.close()

    async def over_aio():
        async with tga.InferenceServerClient(d["grpc_url"]) as ac:
            index = await ac.get_model_repository_index(as_json=True)
            with pytest.raises(InferenceServerException) as info:
                await ac.unload_model("tgaff")
            return index, info.value

    index, refused = asyncio.run(over_aio())
    assert [m["version"] for m in index["models"]] == ["1", "2"]
    assert refused.message() == MANAGED


# ---------------------------------------------------------------- streaming


def test_stream_answers_in_order_and_right(served, shared):
    """32 requests of mixed sizes sent at once on one stream: every answer in order, with
    its id, equal to ONNX Runtime's, and each counted once in statistics, metrics, log."""
    d = served["tgmix"]
    before_stats, before_metrics = successes(d, "tgmix"), counted(d, "success")
    answers: queue.Queue = queue.Queue()
    c = tg.InferenceServerClient(d["grpc_url"])
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = []
    for i in range(STREAMED):
        inputs, feeds = mixed_inputs(1 + i % 4, seed=i)
        c.async_stream_infer("tgmix", inputs, request_id=f"stream-{i}")
        sent.append(feeds)
    got = [answers.get(timeout=30) for _ in sent]
    c.stop_stream()
    c.close()
    for i, ((result, error), feeds) in enumerate(zip(got, sent)):
        assert error is None, error
        response = result.get_response()
        assert (response.id, response.model_name, response.model_version) == \
            (f"stream-{i}", "tgmix", "1")
        for name, want in expected_outputs(d["path"], feeds).items():
            np.testing.assert_array_equal(result.as_numpy(name), want, err_msg=f"{i} {name}")
    assert successes(d, "tgmix") - before_stats == STREAMED
    assert counted(d, "success") - before_metrics == STREAMED
    entries = wait_for(lambda: len(logged(shared, "tgmix", "stream-")) >= STREAMED and
                       logged(shared, "tgmix", "stream-"), what="the request log")
    assert len(entries) == STREAMED
    assert all(e["status"] == 200 and e["version"] == 1 for e in entries.values())


def test_stream_over_aio(served):
    d = served["tgmix"]
    sent = [mixed_inputs(2, seed=100 + i) for i in range(STREAMED)]

    async def requests():
        for i, (inputs, _) in enumerate(sent):
            yield {"model_name": "tgmix", "inputs": inputs, "request_id": f"aio-{i}"}

    async def stream():
        async with tga.InferenceServerClient(d["grpc_url"]) as c:
            return [item async for item in c.stream_infer(requests())]

    got = asyncio.run(stream())
    assert len(got) == STREAMED
    for i, ((result, error), (_, feeds)) in enumerate(zip(got, sent)):
        assert error is None, error
        assert result.get_response().id == f"aio-{i}"
        want = expected_outputs(d["path"], feeds)
        np.testing.assert_array_equal(result.as_numpy("count"), want["count"])
        np.testing.assert_array_equal(result.as_numpy("sum"), want["sum"])


def test_a_bad_stream_request_gets_its_error_and_the_stream_goes_on(served):
    d = served["tgmix"]
    answers: queue.Queue = queue.Queue()
    c = tg.InferenceServerClient(d["grpc_url"])
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    good, feeds = mixed_inputs(1, seed=7)
    c.async_stream_infer("tgmix", good, request_id="first")
    c.async_stream_infer("tgmix", good[:1], request_id="bad")  # 'b' missing
    c.async_stream_infer("tgmix", good, request_id="after", model_version="9")
    c.async_stream_infer("tgmix", good, request_id="last")
    got = [answers.get(timeout=30) for _ in range(4)]
    c.stop_stream()
    with pytest.raises(InferenceServerException) as unary:
        c.infer("tgmix", good[:1])
    c.close()
    assert got[0][1] is None and got[0][0].get_response().id == "first"
    assert got[1][0] is None and got[1][1].message() == unary.value.message() == \
        "missing input 'b'"
    assert got[2][1].message() == "version '9' of model 'tgmix' is not loaded (loaded: 1)"
    assert got[3][1] is None and got[3][0].get_response().id == "last"
    np.testing.assert_array_equal(got[3][0].as_numpy("count"), feeds["b"] * 2)


def test_stream_errors_carry_the_id_and_the_version(served):
    """What tritonclient's callback does not show: an error's infer_response names the
    request and, once chosen, the version that refused it (the unary call's trailers)."""
    d = served["tgmix"]
    bad = service_pb2.ModelInferRequest(model_name="tgmix", id="r1")
    bad.inputs.add(name="a", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1, 2, 3])
    unknown = service_pb2.ModelInferRequest(model_name="nope", id="r2")
    channel = grpc.insecure_channel(d["grpc_url"])
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   response_deserializer=service_pb2.ModelStreamInferResponse
                                   .FromString)
    messages = [bad.SerializeToString(), unknown.SerializeToString(), b"\xff\xff"]
    first, second, third = list(stream(iter(messages), timeout=30))
    channel.close()
    assert first.error_message == "missing input 'b'"
    assert (first.infer_response.id, first.infer_response.model_version) == ("r1", "1")
    assert second.error_message == "model 'nope' not found; this port serves 'tgmix'"
    assert (second.infer_response.id, second.infer_response.model_version) == ("r2", "")
    assert third.error_message == "the request is not a valid ModelInferRequest message"


def test_token_streams_and_health(shared, affine_v1):
    """With --token, a stream needs it (once, in its metadata); health does not."""
    d = shared.json("deploy", affine_v1, "--name", "tgtok", "--token", "s3cret")["deployment"]
    channel = grpc.insecure_channel(d["grpc_url"])
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="tgtok")).status == SERVING
    channel.close()
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    c = tg.InferenceServerClient(d["grpc_url"])
    for headers, expect in ((None, "StatusCode.UNAUTHENTICATED"),
                            ({"authorization": "Bearer s3cret"}, None)):
        answers: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: answers.put((result, error)),
                       headers=headers)
        try:
            c.async_stream_infer("tgtok", [x], request_id="t")
        except InferenceServerException:  # the server may end the stream before it is sent
            assert expect is not None
        result, error = answers.get(timeout=30)
        c.stop_stream()
        if expect is None:
            assert error is None and result.as_numpy("y").tolist() == [[1, 2, 3, 4]]
        else:
            assert result is None and error.status() == expect
            assert "missing or wrong token" in error.message()
    c.close()
    shared.ok("undeploy", "tgtok")


# ---------------------------------------------------------------- health


def running(d: dict) -> bool:
    text = httpx.get(d["url"] + "/metrics").text
    return bool(re.search(r"^mserve_queue_depth(\{[^}]*\})? 1\.0$", text, re.M))


def test_health_serving_then_not_serving_while_an_undeploy_drains(shared, model_dir):
    d = shared.json("deploy", models.slow(model_dir / "tgslow.onnx"), "--name",
                    "tgslow")["deployment"]
    channel = grpc.insecure_channel(d["grpc_url"])
    health = health_pb2_grpc.HealthStub(channel)

    def check(service: str = ""):
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert check() == check("tgslow") == check("inference.GRPCInferenceService") == SERVING
    with pytest.raises(grpc.RpcError) as info:
        check("nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watched: list = []
    watch = health.Watch(health_pb2.HealthCheckRequest(service="tgslow"))
    watcher = threading.Thread(target=lambda: _collect(watch, watched))
    watcher.start()
    wait_for(lambda: watched == [SERVING], what="the watch's first status")
    c = tg.InferenceServerClient(d["grpc_url"])
    x, n = tg.InferInput("x", [1, 4], "FP32"), tg.InferInput("n", [], "INT64")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    # 2-7 s (0.6-2 µs an iteration): past the undeploy's start, within its 10 s drain
    n.set_data_from_numpy(np.array(3_000_000, dtype=np.int64))
    answer: dict = {}
    caller = threading.Thread(target=lambda: answer.update(y=c.infer("tgslow", [x, n])))
    caller.start()
    wait_for(lambda: running(d), what="the call to be running")
    undeploy = threading.Thread(target=shared.ok, args=("undeploy", "tgslow"))
    undeploy.start()
    wait_for(lambda: check() == NOT_SERVING, what="NOT_SERVING while draining")
    assert check("tgslow") == NOT_SERVING
    assert watched == [SERVING, NOT_SERVING]
    rpc = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert not rpc.ServerReady(service_pb2.ServerReadyRequest()).ready
    with pytest.raises(InferenceServerException) as refused:  # new work during the drain
        c.infer("tgslow", [x, n])
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    caller.join()
    undeploy.join()
    watcher.join()
    assert answer["y"].as_numpy("y").tolist() == [[1, 1, 1, 1]]  # the call in flight ended
    with pytest.raises(grpc.RpcError):
        check()
    c.close()
    channel.close()


def _collect(watch, into: list) -> None:
    try:
        for response in watch:
            into.append(response.status)
    except grpc.RpcError:
        pass  # the server stopped


def test_open_streams_and_watches_do_not_hold_an_undeploy(shared, affine_v1):
    """An idle stream and a health watch end with the drain instead of holding it for the
    whole drain timeout (10 s in tests): the stream with UNAVAILABLE, once answered."""
    d = shared.json("deploy", affine_v1, "--name", "tgidle")["deployment"]
    channel = grpc.insecure_channel(d["grpc_url"])
    watched: list = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    watcher = threading.Thread(target=lambda: _collect(watch, watched))
    watcher.start()
    answers: queue.Queue = queue.Queue()
    c = tg.InferenceServerClient(d["grpc_url"])
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    c.async_stream_infer("tgidle", [x])
    assert answers.get(timeout=30)[1] is None
    started = time.monotonic()
    shared.ok("undeploy", "tgidle")
    assert time.monotonic() - started < 8
    result, error = answers.get(timeout=30)
    assert result is None and error.status() == "StatusCode.UNAVAILABLE"
    assert error.message() == "deployment 'tgidle' is shutting down"
    c.stop_stream()
    c.close()
    watcher.join()
    assert watched == [SERVING, NOT_SERVING]
    channel.close()
