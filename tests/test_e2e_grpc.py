"""The Open Inference Protocol's gRPC service through real workers: NVIDIA's tritonclient.grpc
for health, metadata, inference (typed and raw, every datatype) and statistics; pinned
versions; errors as gRPC status codes with the HTTP messages; token and TLS; no failed call
across a deploy and a rollback under load; draining; `mserve predict --grpc`."""

from __future__ import annotations

import json
import threading
from collections import Counter

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from onnx import helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import wait_for
from tests.test_e2e_security import self_signed

pytestmark = pytest.mark.e2e
CLIENTS = 4
# The typed field of each datatype (PROTOCOL.md 2.3); FP16 has none: raw only.
FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
          "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
          "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
          "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def sample_data() -> dict[str, np.ndarray]:
    """[3, 2] of every datatype, with each integer type's extremes and float specials."""
    data = {}
    for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"):
        dtype = np.dtype(dt.lower())
        info = np.iinfo(dtype)
        data[dt] = np.array([[info.min, info.max], [0, 1], [info.max - 1, 7]], dtype=dtype)
    for dt, dtype in (("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)):
        data[dt] = np.array([[0.5, -1.25], [np.inf, -0.0], [np.nan, 65504]], dtype=dtype)
    data["BOOL"] = np.array([[True, False], [False, True], [True, True]])
    data["BYTES"] = np.array([[b"a", b"bc"], [b"", b"\xc3\xa9"], [b"x", b"\x00z"]],
                             dtype=object)
    return data


def typed_identities(path):
    """Like models.identities, without FP16 (which only travels raw)."""
    nodes, inputs, outputs = [], [], []
    for name, elem in models.ALL_TYPES.items():
        if name != "FP16":
            inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["N", 2]))
            outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["N", 2]))
            nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return models._save(helper.make_graph(nodes, "typed", inputs, outputs), path)


@pytest.fixture(scope="module")
def served(shared, model_dir, affine_v1, affine_v2):
    """Deployments on the shared daemon: name -> its description from `mserve deploy`."""
    plan = {
        "gmixed": [models.mixed(model_dir / "gmixed.onnx")],
        "gtypes": [models.identities(model_dir / "gtypes.onnx")],
        "gtyped": [typed_identities(model_dir / "gtyped.onnx"), "--max-body-mb", "1"],
        "gaff": [affine_v1],
    }
    served = {name: shared.json("deploy", *args[:1], "--name", name, *args[1:])["deployment"]
              for name, args in plan.items()}
    served["gaff"] = shared.json("deploy", affine_v2, "--name", "gaff")["deployment"]
    yield served
    undeploys = [threading.Thread(target=shared.run, args=("undeploy", name)) for name in served]
    for t in undeploys:
        t.start()
    for t in undeploys:
        t.join()


def client(d: dict, **kw) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(d["grpc_url"], **kw)


def stub(d: dict):
    """The raw generated stub (tritonclient's messages) for typed contents and bad requests."""
    channel = grpc.insecure_channel(d["grpc_url"])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def typed_request(doc: dict, model: str) -> service_pb2.ModelInferRequest:
    """An OIP JSON request as a ModelInferRequest with typed contents."""
    request = service_pb2.ModelInferRequest(model_name=model, id=doc.get("id", ""))
    for item in doc["inputs"]:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"],
                                    shape=item["shape"])
        getattr(tensor.contents, FIELDS.get(item["datatype"], "fp32_contents")).extend(
            np.array(item["data"]).reshape(-1).tolist())
    for item in doc.get("outputs", []):
        request.outputs.add(name=item["name"])
    return request


def rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value


def test_descriptors_match_tritonclients():
    """Every message, enum and RPC of ours has tritonclient's field names, numbers, types and
    enum values (the model configuration's messages are tritonclient's model_config.proto)."""
    from mserve.daemon.protocol.proto import grpc_service_pb2 as ours

    def fields(message) -> dict:
        return {f.name: (f.number, f.type, f.is_repeated,
                         f.message_type and f.message_type.full_name,
                         f.enum_type and f.enum_type.full_name) for f in message.fields}

    def values(enum) -> dict:
        return {v.name: v.number for v in enum.values}

    def walk(message):
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    theirs_pool = service_pb2.DESCRIPTOR.pool
    enums = list(ours.DESCRIPTOR.enum_types_by_name.values())
    for top in ours.DESCRIPTOR.message_types_by_name.values():
        for message in walk(top):
            enums.extend(message.enum_types)
            assert fields(message) == {k: v for k, v in fields(
                theirs_pool.FindMessageTypeByName(message.full_name)).items()
                if k in fields(message)}, message.full_name
    assert "inference.ModelConfig" in {m.full_name for m in
                                       ours.DESCRIPTOR.message_types_by_name.values()}
    for enum in enums:
        assert values(enum) == values(theirs_pool.FindEnumTypeByName(enum.full_name)), \
            enum.full_name
    ours_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = theirs_pool.FindServiceByName("inference.GRPCInferenceService")
    for method in ours_service.methods:
        twin = theirs_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == \
            (twin.input_type.full_name, twin.output_type.full_name, twin.client_streaming,
             twin.server_streaming), method.name


def test_error_statuses_map_to_grpc_codes():
    from mserve.daemon import errors
    from mserve.daemon.worker.grpc_server import status_code

    expected = {errors.BadRequest: "INVALID_ARGUMENT", errors.Unauthorized: "UNAUTHENTICATED",
                errors.NotFound: "NOT_FOUND", errors.Unavailable: "UNAVAILABLE",
                errors.PayloadTooLarge: "RESOURCE_EXHAUSTED", errors.Conflict: "INTERNAL",
                errors.MserveError: "INTERNAL"}
    for cls, code in expected.items():
        assert status_code(cls("x")).name == code, cls


def test_tritonclient_health_metadata_inference_statistics(served):
    d = served["gmixed"]
    assert d["grpc_url"] == f"127.0.0.1:{d['grpc_port']}"
    c = client(d)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("gmixed") and c.is_model_ready("gmixed", "1")
    assert not c.is_model_ready("gmixed", "2")
    server = c.get_server_metadata(as_json=True)
    assert server["name"] == "mserve" and "statistics" in server["extensions"]
    meta = c.get_model_metadata("gmixed", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "a": ("FP32", ["-1", "3"]), "b": ("INT64", ["-1", "3"])}
    before = c.get_inference_statistics("gmixed", as_json=True)["model_stats"][0]
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    inputs = [tg.InferInput("a", [2, 3], "FP32"), tg.InferInput("b", [2, 3], "INT64")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    for i in range(3):
        result = c.infer("gmixed", inputs, request_id=f"r{i}",
                         headers={"x-request-id": f"grpc-log-{i}"})
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        np.testing.assert_array_equal(result.as_numpy("count"), b * 2)
        assert result.get_response().id == f"r{i}"
        assert result.get_response().model_version == "1"
    only = c.infer("gmixed", inputs, outputs=[tg.InferRequestedOutput("count")])
    assert only.as_numpy("sum") is None and only.as_numpy("count") is not None
    # the same statistics, over gRPC (one model or all) and over HTTP
    after = c.get_inference_statistics("gmixed", as_json=True)["model_stats"][0]
    success = int(after["inference_stats"]["success"]["count"])
    assert success - int(before["inference_stats"]["success"].get("count", 0)) == 4
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 8
    every = c.get_inference_statistics("", as_json=True)["model_stats"]
    assert [s["name"] for s in every] == ["gmixed"]
    http = httpx.get(d["url"] + "/v2/models/gmixed/stats").json()["model_stats"][0]
    assert http["inference_stats"]["success"]["count"] == success
    c.close()


def test_calls_reach_the_request_log_and_metrics(served, shared):
    d = served["gmixed"]
    c = client(d)
    x = [tg.InferInput("a", [1, 3], "FP32"), tg.InferInput("b", [1, 3], "INT64")]
    x[0].set_data_from_numpy(np.ones((1, 3), np.float32))
    x[1].set_data_from_numpy(np.ones((1, 3), np.int64))
    c.infer("gmixed", x, headers={"x-request-id": "grpc-logged"})
    with pytest.raises(InferenceServerException):
        c.infer("gmixed", x[:1], headers={"x-request-id": "grpc-failed"})
    c.close()
    log = shared.home / "logs" / "gmixed.requests.jsonl"

    def lines():
        return {e["id"]: e for e in map(json.loads, log.read_text().splitlines())
                if e["id"].startswith("grpc-")}

    logged = wait_for(lambda: {"grpc-logged", "grpc-failed"} <= set(lines()) and lines(),
                      what="the request log")
    ok, failed = logged["grpc-logged"], logged["grpc-failed"]
    assert ok["status"] == 200 and ok["version"] == 1 and ok["bytes_in"] > 0
    assert ok["bytes_out"] > 0 and ok["client"].startswith("127.0.0.1:")
    assert failed["status"] == 400 and failed["error"] == "missing input 'b'"
    metrics = httpx.get(d["url"] + "/metrics").text
    assert 'mserve_requests_total{code="400",model="gmixed",outcome="failure",version="1"}' \
        in metrics


def test_every_datatype_raw_and_typed(served):
    data = sample_data()
    c = client(served["gtypes"])
    inputs, outputs = [], [tg.InferRequestedOutput(f"out_{dt}") for dt in data]
    for dt, arr in data.items():
        inputs.append(tg.InferInput(f"in_{dt}", list(arr.shape), dt))
        inputs[-1].set_data_from_numpy(arr)
    result = c.infer("gtypes", inputs, outputs=outputs)
    for dt, arr in data.items():
        got = result.as_numpy(f"out_{dt}")
        assert got.dtype == arr.dtype and got.shape == arr.shape, dt
        np.testing.assert_array_equal(got, arr, err_msg=dt)
    c.close()
    # typed contents: every datatype that has a typed field
    request = service_pb2.ModelInferRequest(model_name="gtyped")
    for dt, arr in data.items():
        if dt != "FP16":
            tensor = request.inputs.add(name=f"in_{dt}", datatype=dt, shape=arr.shape)
            getattr(tensor.contents, FIELDS[dt]).extend(arr.reshape(-1).tolist())
    channel, rpc = stub(served["gtyped"])
    response = rpc.ModelInfer(request)
    assert len(response.raw_output_contents) == len(response.outputs) == 12
    result = tg.InferResult(response)
    for dt, arr in data.items():
        if dt != "FP16":
            got = result.as_numpy(f"out_{dt}")
            assert got.dtype == arr.dtype, dt
            np.testing.assert_array_equal(got, arr, err_msg=dt)
    channel.close()


def test_version_pinned_requests(served):
    c = client(served["gaff"])
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    active = c.infer("gaff", [x])
    assert active.get_response().model_version == "2"
    np.testing.assert_array_equal(active.as_numpy("y"), [[3, 5, 7, 9]])
    pinned = c.infer("gaff", [x], model_version="1")
    assert pinned.get_response().model_version == "1"
    np.testing.assert_array_equal(pinned.as_numpy("y"), [[1, 2, 3, 4]])
    assert c.is_model_ready("gaff", "1") and not c.is_model_ready("gaff", "7")
    assert c.get_model_metadata("gaff", "1", as_json=True)["versions"] == ["1", "2"]
    stats = c.get_inference_statistics("gaff", "1", as_json=True)["model_stats"]
    assert [(s["version"], s["inference_stats"]["success"]["count"]) for s in stats] == \
        [("1", "1")]
    with pytest.raises(InferenceServerException) as info:
        c.infer("gaff", [x], model_version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert info.value.message() == "version '7' of model 'gaff' is not loaded (loaded: 1, 2)"
    c.close()


BAD_REQUESTS = {
    "wrong datatype": {"inputs": [{"name": "a", "datatype": "INT32", "shape": [1, 3],
                                   "data": [1, 2, 3]}]},
    "unknown datatype": {"inputs": [{"name": "a", "datatype": "FP8", "shape": [1, 3],
                                     "data": [1, 2, 3]}]},
    "missing input": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3],
                                  "data": [1, 2, 3]}]},
    "unknown input": {"inputs": [{"name": "zz", "datatype": "FP32", "shape": [1, 3],
                                  "data": [1, 2, 3]}]},
    "wrong rank": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [3],
                               "data": [1, 2, 3]}]},
    "fixed dim": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4],
                              "data": [1, 2, 3, 4]}]},
    "element count": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3],
                                  "data": [1, 2]}]},
    "negative dim": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3],
                                 "data": [1, 2, 3]}]},
    "unknown output": {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3],
                                 "data": [1, 2, 3]},
                                {"name": "b", "datatype": "INT64", "shape": [1, 3],
                                 "data": [1, 2, 3]}],
                     "outputs": [{"name": "nope"}]},
}


def test_errors_are_status_codes_with_the_http_messages(served):
    d = served["gmixed"]
    channel, rpc = stub(d)
    for case, doc in BAD_REQUESTS.items():
        http = httpx.post(d["url"] + "/v2/models/gmixed/infer", json=doc)
        assert http.status_code == 400, case
        err = rpc_error(rpc.ModelInfer, typed_request(doc, "gmixed"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert err.details() == http.json()["error"], case
    err = rpc_error(rpc.ModelInfer, typed_request(BAD_REQUESTS["missing input"], "other"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == httpx.post(d["url"] + "/v2/models/other/infer", json={}).json()[
        "error"] == "model 'other' not found; this port serves 'gmixed'"
    assert rpc_error(rpc.ModelMetadata, service_pb2.ModelMetadataRequest(
        name="other")).code() == grpc.StatusCode.NOT_FOUND
    # what only gRPC can get wrong
    raw = service_pb2.ModelInferRequest(model_name="gmixed", raw_input_contents=[b"\0" * 8])
    raw.inputs.add(name="a", datatype="FP32", shape=[1, 3])
    err = rpc_error(rpc.ModelInfer, raw)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("input 'a': raw_input_contents has 8 bytes but shape [1, 3] of "
                             "FP32 needs 12 bytes")
    wrong_field = typed_request(BAD_REQUESTS["missing input"], "gmixed")
    wrong_field.inputs[0].datatype = "INT64"
    err = rpc_error(rpc.ModelInfer, wrong_field)
    assert err.details() == ("input 'a': INT64 data goes in contents.int64_contents, got "
                             "contents.fp32_contents")
    garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    assert rpc_error(garbage, b"\xff\xff\xff").code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    # FP16 has no typed field; a message over --max-body-mb is refused before it is read
    channel, rpc = stub(served["gtypes"])
    fp16 = service_pb2.ModelInferRequest(model_name="gtypes")
    fp16.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 2])
    err = rpc_error(rpc.ModelInfer, fp16)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16 data must be sent in raw_input_contents" in err.details()
    channel.close()
    channel, rpc = stub(served["gtyped"])
    huge = service_pb2.ModelInferRequest(model_name="gtyped", raw_input_contents=[
        b"\0" * (2 * 2**20)])
    huge.inputs.add(name="in_FP32", datatype="FP32", shape=[2**18, 2])
    assert rpc_error(rpc.ModelInfer, huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


def test_token_and_tls(shared, affine_v1, tmp_path):
    cert, key = self_signed(tmp_path)
    d = shared.json("deploy", affine_v1, "--name", "gsec", "--token", "s3cret", "--tls-cert",
                    cert, "--tls-key", key)["deployment"]
    secure = {"ssl": True, "root_certificates": str(cert),
              "channel_args": [("grpc.ssl_target_name_override", "mserve-test")]}
    c = client(d, **secure)
    assert c.is_server_live() and c.is_server_ready()  # health needs no token
    for headers in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as info:
            c.is_model_ready("gsec", headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "missing or wrong token" in info.value.message()
    x = tg.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    good = {"authorization": "Bearer s3cret"}
    assert c.infer("gsec", [x], headers=good).as_numpy("y").tolist() == [[1, 1, 1, 1]]
    c.close()
    plain = client(d)
    with pytest.raises(InferenceServerException):
        plain.is_server_live()
    plain.close()
    body = json.dumps({"x": [[1, 2, 3, 4]]})
    out = shared.json("predict", "gsec", "-", "--grpc", "--token", "s3cret", input=body)
    assert out["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert "missing or wrong token" in shared.fail("predict", "gsec", "-", "--grpc",
                                                   input=body)
    shared.ok("undeploy", "gsec")


def test_no_failed_call_across_deploy_and_rollback_under_load(shared, affine_v1, tmp_path):
    d = shared.json("deploy", affine_v1, "--name", "gload")["deployment"]
    stop = threading.Event()
    outcomes: Counter = Counter()
    versions: Counter = Counter()
    lock = threading.Lock()

    def load():
        c = client(d)
        x = tg.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        while not stop.is_set():
            try:
                version, key = c.infer("gload", [x]).get_response().model_version, "ok"
            except InferenceServerException as exc:
                version, key = None, exc.status()
            with lock:
                outcomes[key] += 1
                versions[version] += 1
        c.close()

    threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: outcomes["ok"] > 10, what="the load to start")
        shared.json("deploy", models.affine(tmp_path / "s2.onnx", scale=2.0), "--name", "gload")
        shared.json("rollback", "gload")
        served_by_1 = versions["1"]
        wait_for(lambda: versions["1"] > served_by_1 + 10, what="calls after the rollback")
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"gRPC calls across a deploy and a rollback: {dict(outcomes)} {dict(versions)}")
    assert set(outcomes) == {"ok"}, outcomes
    assert outcomes["ok"] > 50
    assert versions["2"] > 0, versions
    shared.ok("undeploy", "gload")


def slow_deployment(shared, model_dir, name: str, iterations: int):
    """Deploy the Loop model as ``name``: (deployment, client, inputs of a call that runs
    ``iterations`` empty iterations, about 0.6 µs each)."""
    d = shared.json("deploy", models.slow(model_dir / f"{name}.onnx"), "--name",
                    name)["deployment"]
    x, n = tg.InferInput("x", [1, 4], "FP32"), tg.InferInput("n", [], "INT64")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    n.set_data_from_numpy(np.array(iterations, dtype=np.int64))
    return d, client(d), [x, n]


def test_undeploy_drains_calls_in_flight(shared, model_dir):
    d, c, (x, n) = slow_deployment(shared, model_dir, "gslow", 1_000_000)
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(y=c.infer("gslow", [x, n])))
    caller.start()
    wait_for(lambda: 'mserve_queue_depth{model="gslow",version="1"} 1.0' in httpx.get(
                 d["url"] + "/metrics").text,
             what="the call to be running")
    shared.ok("undeploy", "gslow")
    caller.join()
    assert answer["y"].as_numpy("y").tolist() == [[1, 1, 1, 1]]
    with pytest.raises(InferenceServerException):
        c.is_server_live()
    c.close()


def test_a_cancelled_call_counts_as_cancelled_not_failed(shared, model_dir):
    d, c, inputs = slow_deployment(shared, model_dir, "gcancel", 300_000)  # about 0.2 s
    with pytest.raises(InferenceServerException, match="Deadline"):
        c.infer("gcancel", inputs, client_timeout=0.05)
    c.close()
    wanted = ('mserve_requests_total{code="499",model="gcancel",outcome="cancelled",'
              'version="1"} 1.0')
    wait_for(lambda: wanted in httpx.get(d["url"] + "/metrics").text,
             what="the cancelled call in the metrics")
    assert 'outcome="failure"' not in httpx.get(d["url"] + "/metrics").text
    shared.ok("undeploy", "gcancel")


def test_predict_grpc(served, shared):
    mapping = json.dumps({"a": [[1, 2, 3]], "b": [[4, 5, 6]]})
    over_http = shared.json("predict", "gmixed", "-", input=mapping)
    assert shared.json("predict", "gmixed", "-", "--grpc", input=mapping) == over_http
    assert over_http["outputs"][1]["data"] == [8, 10, 12]
    doc = {"id": "p1", "inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3],
                                   "data": [1, 2, 3]},
                                  {"name": "b", "datatype": "INT64", "shape": [1, 3],
                                   "data": [1, 1, 1]}],
           "outputs": [{"name": "sum"}]}
    out = shared.json("predict", "gaff", "-", "--grpc", "--version", "1",
                      input=json.dumps({"x": [[1, 2, 3, 4]]}))
    assert out["model_version"] == "1" and out["outputs"][0]["data"] == [1, 2, 3, 4]
    out = shared.json("predict", "gmixed", "-", "--grpc", input=json.dumps(doc))
    assert out["id"] == "p1" and [o["name"] for o in out["outputs"]] == ["sum"]
    bad = json.dumps({"a": [[1, 2, 3]]})
    assert shared.fail("predict", "gmixed", "-", "--grpc", input=bad) == \
        shared.fail("predict", "gmixed", "-", input=bad)
    assert "'instances'" in shared.fail("predict", "gmixed", "-", "--grpc",
                                        input=json.dumps({"instances": [[1, 2, 3]]}))
