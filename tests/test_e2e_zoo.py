"""Right answers under concurrency for models shaped like real exporters write them
(tests/zoo.py): every zoo model served by one daemon, over JSON, Triton's binary tensor
extension and gRPC, one request alone and then 32 at once of mixed sizes; each answer is
compared with ONNX Runtime run in-process on the same input. A batcher that joins requests
along a dim 0 that is not a batch (time, detections, a quantization scale shared by the
run) answers wrongly with a 200: these tests count such answers and want none."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from tests import zoo
from tests.conftest import Mserve, installation, wait_for

pytestmark = pytest.mark.e2e
BURST = 32
PROTOCOLS = ("json", "binary", "grpc")
# Requests wait up to 5 ms for company: joins happen on every burst, so do their bugs.
DEPLOY_OPTIONS = ("--batch-delay-ms", "5")
TOLERANCE = {np.dtype(np.float16): (2e-3, 2e-3), np.dtype(np.float32): (1e-5, 1e-6),
             np.dtype(np.float64): (1e-12, 1e-12)}


@dataclass
class Served:
    model: zoo.Model
    url: str = ""
    grpc: tg.InferenceServerClient | None = None
    error: str = ""  # why the deploy failed
    session: object = None  # the in-process reference
    outputs: tuple[str, ...] = ()


@dataclass
class Farm:
    mserve: Mserve
    served: dict[str, Served]
    http: httpx.Client
    pool: ThreadPoolExecutor

    def deployed(self, name: str) -> Served:
        s = self.served[name]
        assert not s.error, f"deploying {name} failed: {s.error}"
        return s


@pytest.fixture(scope="module")
def farm():
    """One daemon serving the whole zoo (built in a temp folder), a shared HTTP client and
    32 threads to send from."""
    folder = Path(tempfile.mkdtemp(prefix="ms-zoo-"))
    home = installation()
    mserve, served = next(home), {}
    try:
        served = {m.name: deploy(mserve, m, folder) for m in zoo.ZOO}
        listed = {d["name"]: d for d in mserve.json("list")}
        for s in served.values():
            if not s.error:
                s.grpc = tg.InferenceServerClient(listed[s.model.name]["grpc_url"])
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=BURST)) as http, \
                ThreadPoolExecutor(BURST) as pool:
            yield Farm(mserve, served, http, pool)
    finally:
        for s in served.values():
            if s.grpc is not None:
                s.grpc.close()
        next(home, None)  # stops the daemon and its workers, removes the home
        shutil.rmtree(folder, ignore_errors=True)


def deploy(mserve, model: zoo.Model, folder: Path) -> Served:
    path = model.build(folder)
    session = zoo.reference_session(path)
    served = Served(model, session=session,
                    outputs=tuple(o.name for o in session.get_outputs()))
    result = mserve.run("deploy", path, "--name", model.name, *DEPLOY_OPTIONS, "--json")
    if result.returncode:
        served.error = (result.stderr or result.stdout).strip()
    else:
        served.url = json.loads(result.stdout)["deployment"]["url"]
    return served


# ---- the three protocols: each sends one zoo.Request and gives {name: array} -------------

def send_json(http: httpx.Client, s: Served, req: zoo.Request,
              request_id: str = "") -> dict[str, np.ndarray]:
    """JSON tensors (flat data) both ways, as curl or a KServe SDK sends them."""
    body = {"inputs": [{"name": k, "datatype": np_to_triton_dtype(v.dtype),
                        "shape": list(v.shape), "data": v.ravel().tolist()}
                       for k, v in req.inputs.items()]}
    if request_id:
        body["id"] = request_id
    if req.outputs:
        body["outputs"] = [{"name": n} for n in req.outputs]
    r = http.post(f"{s.url}/v2/models/{s.model.name}/infer", json=body)
    if r.status_code != 200:
        raise AssertionError(f"HTTP {r.status_code}: {r.text[:200]}")
    return {o["name"]: _from_json(o) for o in r.json()["outputs"]}


def _from_json(output: dict) -> np.ndarray:
    dtype = triton_to_np_dtype(output["datatype"])
    return np.array(output["data"], dtype=dtype).reshape(output["shape"])


def send_binary(http: httpx.Client, s: Served, req: zoo.Request) -> dict[str, np.ndarray]:
    """tritonclient.http's own encoding and decoding (binary tensors both ways), over httpx."""
    inputs = []
    for k, v in req.inputs.items():
        inputs.append(th.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype)))
        inputs[-1].set_data_from_numpy(v, binary_data=True)
    names = req.outputs or s.outputs
    outputs = [th.InferRequestedOutput(n, binary_data=True) for n in names]
    body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    r = http.post(f"{s.url}/v2/models/{s.model.name}/infer", content=body,
                  headers={"Inference-Header-Content-Length": str(json_size),
                           "Content-Type": "application/octet-stream"})
    if r.status_code != 200:
        raise AssertionError(f"HTTP {r.status_code}: {r.text[:200]}")
    result = th.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    return {n: result.as_numpy(n) for n in names}


def send_grpc(http: httpx.Client, s: Served, req: zoo.Request) -> dict[str, np.ndarray]:
    """tritonclient.grpc on the deployment's gRPC port (``http`` unused: one signature)."""
    inputs = []
    for k, v in req.inputs.items():
        inputs.append(tg.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype)))
        inputs[-1].set_data_from_numpy(v)
    names = req.outputs or s.outputs
    result = s.grpc.infer(s.model.name, inputs,
                          outputs=[tg.InferRequestedOutput(n) for n in names], client_timeout=30)
    return {n: result.as_numpy(n) for n in names}


SENDERS = {"json": send_json, "binary": send_binary, "grpc": send_grpc}


# ---- comparing with ONNX Runtime ---------------------------------------------------------

def expected(s: Served, req: zoo.Request) -> dict:
    names = list(req.outputs or s.outputs)
    return dict(zip(names, s.session.run(names, req.inputs)))


def differences(model: zoo.Model, want: dict, got: dict) -> list[str]:
    """What differs between ORT's outputs and the served ones (empty: the same)."""
    if set(got) != set(want):
        return [f"outputs {sorted(got)}, expected {sorted(want)}"]
    found = []
    for name, value in want.items():
        try:
            if name in model.maps:
                _same_maps(value, got[name])
            else:
                _same_tensor(value, got[name])
        except AssertionError as exc:
            found.append(f"{name}: {' '.join(str(exc).split())[:300]}")
    return found


def _text(array: np.ndarray) -> np.ndarray:
    """BYTES elements as str (the JSON codec gives str, the binary ones bytes)."""
    out = np.empty(array.shape, dtype=object)
    out.flat = [v.decode() if isinstance(v, bytes) else v for v in array.flat]
    return out


def _same_maps(rows: list[dict], got: np.ndarray) -> None:
    """A ZipMap output: ORT's list of dicts against a BYTES tensor of JSON text per row."""
    assert got.shape == (len(rows),), f"shape {got.shape}, expected ({len(rows)},)"
    for i, (row, text) in enumerate(zip(rows, _text(got))):
        served = json.loads(text)
        assert sorted(served) == sorted(map(str, row)), f"row {i} keys {sorted(served)}"
        keys = sorted(row, key=str)
        np.testing.assert_allclose([served[str(k)] for k in keys], [row[k] for k in keys],
                                   rtol=1e-5, atol=1e-6, err_msg=f"row {i}")


def _same_tensor(want: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    if want.dtype == object:
        np.testing.assert_array_equal(_text(got), want)
        return
    assert got.dtype == want.dtype, f"dtype {got.dtype}, expected {want.dtype}"
    if want.dtype in TOLERANCE:
        rtol, atol = TOLERANCE[want.dtype]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    else:
        np.testing.assert_array_equal(got, want)


# ---- the tests ---------------------------------------------------------------------------

def requests_for(model: zoo.Model, seed: int) -> list[zoo.Request]:
    """One request alone, then BURST of mixed sizes."""
    rng = np.random.default_rng(seed)
    sizes = model.sizes
    return [model.request(rng, sizes[0])] + [model.request(rng, sizes[i % len(sizes)])
                                             for i in range(BURST)]


def burst(pool: ThreadPoolExecutor, send, jobs: list) -> list:
    """``send(job)`` for each job from as many threads, released together; the answers or
    exceptions."""
    barrier = threading.Barrier(len(jobs))

    def one(job):
        barrier.wait(timeout=30)
        try:
            return send(job)
        except Exception as exc:  # a failed request is a wrong answer, listed with the rest
            return exc

    return list(pool.map(one, jobs))


def describe(req: zoo.Request) -> str:
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in req.inputs.items())
    return shapes + (f" -> {list(req.outputs)}" if req.outputs else "")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", [m.name for m in zoo.ZOO])
def test_every_answer_matches_onnxruntime(farm, name, protocol):
    s = farm.deployed(name)
    requests = requests_for(s.model, seed=PROTOCOLS.index(protocol))

    def send(req):
        return SENDERS[protocol](farm.http, s, req)

    answers = [send(requests[0])] + burst(farm.pool, send, requests[1:])
    wrong = []
    for i, (req, got) in enumerate(zip(requests, answers)):
        problems = [f"{type(got).__name__}: {got}"] if isinstance(got, Exception) \
            else differences(s.model, expected(s, req), got)
        if problems:
            kind = "alone" if i == 0 else "concurrent"
            wrong.append(f"{name}/{protocol} request {i} ({kind}, {describe(req)}): "
                         + "; ".join(problems))
    if wrong:
        pytest.fail(f"{len(wrong)} of {len(requests)} answers wrong:\n" + "\n".join(wrong))


def logged(mserve: Mserve, name: str, ids: list[str]) -> dict[str, dict]:
    """The request-log entries of ``ids``, once all are there (the log is flushed at least
    once a second), or those there after 3 s."""
    found: dict[str, dict] = {}

    def complete() -> bool:
        found.update((e["id"], e) for e in mserve.json("logs", name, "-n", "200")
                     if e["id"] in ids)
        return len(found) == len(ids)
    try:
        wait_for(complete, timeout=3, interval=0.2, what=f"{name}'s request log")
    except AssertionError:
        pass  # said below, after what the entries found show
    return found


def declared_batchable(mserve: Mserve, name: str) -> bool:
    return any(v["state"] == "active" and v["batchable"] for v in mserve.json("versions", name))


@pytest.mark.parametrize("name", [m.name for m in zoo.ZOO if m.batching])
def test_row_wise_models_share_runs_under_load(farm, name):
    """The control MLP must batch; the scikit-learn models must when status says they are
    batchable (a batcher that never batches would pass every answer test)."""
    s = farm.deployed(name)
    if s.model.batching == zoo.IF_BATCHABLE and not declared_batchable(farm.mserve, name):
        pytest.skip(f"{name} is not declared batchable")
    ids = [f"load-{i}" for i in range(BURST)]
    jobs = list(zip(ids, requests_for(s.model, seed=7)[1:]))
    answers = burst(farm.pool, lambda job: send_json(farm.http, s, job[1], job[0]), jobs)
    assert not [a for a in answers if isinstance(a, Exception)], answers
    entries = logged(farm.mserve, name, ids)
    sizes = sorted((e["batch"] or 1 for e in entries.values()), reverse=True)
    assert sizes and sizes[0] > 1, f"{name}: every logged run held one request: {sizes}"
    missing = sorted(set(ids) - set(entries), key=ids.index)
    assert not missing, (f"the request log lost {len(missing)} of {len(ids)} requests "
                         f"answered concurrently: {missing}")
