"""Inference pipelines (``--transformer``) through the real daemon and workers: the recs
example (a user id looked up in SQLite, the model, top-k) batched under 32 concurrent users
and equal to ONNX Runtime in-process; script errors; refused versions; the version as the
pair (new script = new version, rollback, pinned versions, idempotent redeploys); gRPC."""

from __future__ import annotations

import shutil
import sqlite3
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "recs"
USERS = 32


@pytest.fixture
def recs(tmp_path) -> Path:
    """A copy of examples/recs (model, script, feature table) that a test may change."""
    folder = tmp_path / "recs"
    folder.mkdir()
    for name in ("model.onnx", "recs.py", "features.sqlite"):
        shutil.copy(EXAMPLE / name, folder / name)
    return folder


def variant(folder: Path, old: str, new: str) -> Path:
    script = folder / "recs.py"
    text = script.read_text()
    assert old in text
    script.write_text(text.replace(old, new))
    return script


def expected(folder: Path, user: int, k: int = 5) -> tuple[list[str], np.ndarray]:
    """What the pipeline must answer for ``user``, computed here: the SQLite row, ONNX
    Runtime in-process, top k."""
    with sqlite3.connect(folder / "features.sqlite") as db:
        row = db.execute("SELECT f0, f1, f2, f3, f4, f5, f6, f7 FROM user_features "
                         "WHERE user_id = ?", [user]).fetchone()
        products = [r[0] for r in db.execute("SELECT product_id FROM products ORDER BY position")]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    scores = session.run(["scores"], {"user_features": np.array([row], dtype=np.float32)})[0][0]
    top = np.argsort(-scores, kind="stable")[:k]
    return [products[i] for i in top], scores[top]


def ask(client: httpx.Client, url: str, user, datatype: str = "INT64") -> httpx.Response:
    return client.post(url, json={"inputs": [{"name": "user_id", "datatype": datatype,
                                              "shape": [1], "data": [user]}]})


def outputs(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return {o["name"]: o["data"] for o in r.json()["outputs"]}


def stats(client: httpx.Client, base: str, name: str) -> dict:
    return client.get(f"{base}/v2/models/{name}/stats").json()["model_stats"][0]


def test_user_ids_go_through_sqlite_in_batches_and_match_onnx_runtime(shared, recs):
    d = shared.json("deploy", recs / "model.onnx", "--name", "precs", "--transformer",
                    recs / "recs.py", "--batch-delay-ms", "20")["deployment"]
    url = d["url"] + "/v2/models/precs/infer"
    answers, barrier = {}, threading.Barrier(USERS)

    def user(uid: int) -> None:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            answers[uid] = outputs(ask(c, url, uid))

    threads = [threading.Thread(target=user, args=(uid,)) for uid in range(1, USERS + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == list(range(1, USERS + 1))
    for uid, got in answers.items():
        products, scores = expected(recs, uid)
        assert got["product_ids"] == products, uid
        np.testing.assert_allclose(got["scores"], scores, rtol=1e-5)
    with httpx.Client() as c:
        s = stats(c, d["url"], "precs")
        assert s["inference_count"] == USERS
        assert s["execution_count"] < USERS  # the model ran in batches of several requests
        assert any(b["batch_size"] > 1 for b in s["batch_stats"])
        # the transformer's time is in compute_input/compute_output and its histograms
        assert s["inference_stats"]["compute_input"]["count"] == USERS
        metrics = c.get(d["url"] + "/metrics").text
        assert f'mserve_request_preprocess_seconds_count{{model="precs",version="1"}} {USERS}.0' \
            in metrics
        assert f'mserve_request_postprocess_seconds_count{{model="precs",version="1"}} ' \
               f'{USERS}.0' in metrics
        meta = c.get(d["url"] + "/v2/models/precs").json()  # the transformer's signature
        assert [i["name"] for i in meta["inputs"]] == ["user_id"]
        assert [o["name"] for o in meta["outputs"]] == ["product_ids", "scores"]
        config = c.get(d["url"] + "/v2/models/precs/config").json()
        assert [i["name"] for i in config["input"]] == ["user_id"]
    shared.ok("undeploy", "precs")


def test_a_preprocess_error_is_that_requests_400_and_the_next_one_succeeds(shared, recs):
    d = shared.json("deploy", recs / "model.onnx", "--name", "perr", "--transformer",
                    recs / "recs.py")["deployment"]
    url = d["url"] + "/v2/models/perr/infer"
    with httpx.Client() as c:
        r = ask(c, url, 99999)
        assert r.status_code == 400
        assert r.json() == {"error": "unknown user id 99999"}
        assert "Traceback" not in r.text
        assert outputs(ask(c, url, 42))["product_ids"] == expected(recs, 42)[0]
    log = (shared.home / "logs" / "perr.log").read_text()
    assert "LookupError: unknown user id 99999" in log and "Traceback" in log
    shared.ok("undeploy", "perr")


AFFINE_SCRIPT = '''
import numpy as np

class Transformer:
    def __init__(self, context):
        self.names = [i["name"] for i in context.inputs]

    def preprocess(self, inputs, headers):
        return {"x": inputs["x"] * 2}

    async def postprocess(self, outputs, inputs):
        if inputs["x"][0, 0] == 13:
            raise RuntimeError("thirteen is unlucky")
        return {"y": outputs["y"] + 1, "names": np.array(self.names, dtype=object)}
'''


def test_sync_and_async_hooks_on_the_models_signature_and_a_postprocess_error(
        shared, tmp_path, affine_v1):
    """No declared signature: requests are checked against the model's; the warm-up runs on
    its zeros; an async postprocess error is a 500 with a short message."""
    script = tmp_path / "affine_t.py"
    script.write_text(AFFINE_SCRIPT)
    d = shared.json("deploy", affine_v1, "--name", "paff", "--transformer", script)["deployment"]
    url = d["url"] + "/v2/models/paff/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    with httpx.Client() as c:
        got = {o["name"]: o["data"] for o in c.post(url, json=body).json()["outputs"]}
        assert got == {"y": [3.0, 5.0, 7.0, 9.0], "names": ["x"]}
        body["inputs"][0]["data"] = [13, 0, 0, 0]
        r = c.post(url, json=body)
        assert r.status_code == 500
        assert r.json() == {"error": "postprocess of transformer 'affine_t.py' failed: "
                                     "thirteen is unlucky"}
        named = {**body, "outputs": [{"name": "y"}]}  # the model's names, none declared
        named["inputs"][0]["data"] = [1, 1, 1, 1]
        assert [o["name"] for o in c.post(url, json=named).json()["outputs"]] == ["y"]
        assert c.post(url, json={**named, "outputs": [{"name": "names"}]}).status_code == 400
        wrong = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4],
                             "data": [1, 2, 3, 4]}]}
        assert c.post(url, json=wrong).status_code == 400  # the model's signature holds
        # v1 :predict goes through the transformer too
        r = c.post(d["url"] + "/v1/models/paff:predict", json={"instances": [[1, 1, 1, 1]]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["y"] == [3.0, 3.0, 3.0, 3.0]
    shared.ok("undeploy", "paff")


def test_a_script_failing_at_import_or_warm_up_is_refused_and_the_old_version_serves(
        shared, recs, tmp_path):
    first = tmp_path / "first"
    shutil.copytree(recs, first)
    variant(first, "import numpy as np", "import numpy as np\nraise ImportError('no numpy here')")
    message = shared.fail("deploy", recs / "model.onnx", "--name", "pbad", "--transformer",
                          first / "recs.py")
    assert "Error:" in message and "no numpy here" in message, message
    assert all(d["name"] != "pbad" for d in shared.json("list"))  # no deployment was made

    d = shared.json("deploy", recs / "model.onnx", "--name", "pbad", "--transformer",
                    recs / "recs.py")["deployment"]
    url = d["url"] + "/v2/models/pbad/infer"
    broken = tmp_path / "broken"
    shutil.copytree(recs, broken)
    variant(broken, "import numpy as np", "import numpy as np\n1 / 0")
    message = shared.fail("deploy", recs / "model.onnx", "--name", "pbad", "--transformer",
                          broken / "recs.py")
    assert "failed to import" in message and "division by zero" in message, message
    cold = tmp_path / "cold"
    shutil.copytree(recs, cold)
    variant(cold, 'np.array([1], dtype=np.int64)', 'np.array([123456], dtype=np.int64)')
    message = shared.fail("deploy", recs / "model.onnx", "--name", "pbad", "--transformer",
                          cold / "recs.py")
    assert "warm-up" in message and "unknown user id 123456" in message, message
    with httpx.Client() as c:
        r = ask(c, url, 42)
        assert outputs(r)["product_ids"] == expected(recs, 42)[0]
        assert r.json()["model_version"] == "1"
    states = [v["state"] for v in shared.json("versions", "pbad")]
    assert states == ["active", "failed", "failed"]
    shared.ok("undeploy", "pbad")


def test_the_version_is_the_pair_rollback_pins_and_idempotent_redeploys(shared, recs, tmp_path):
    model, script = recs / "model.onnx", recs / "recs.py"
    one = shared.json("deploy", model, "--name", "ppair", "--transformer", script)
    d = one["deployment"]
    assert shared.json("deploy", model, "--name", "ppair", "--transformer", script)[
        "changed"] is False  # identical model and script: nothing changes
    variant(recs, "K = 5", "K = 3")
    two = shared.json("deploy", model, "--name", "ppair", "--transformer", script)
    assert two["changed"] is True and two["version"] == 2  # same model, new script
    assert two["transformer"]["model_sha256"] == one["transformer"]["model_sha256"]
    assert two["transformer"]["sha256"] != one["transformer"]["sha256"]
    assert shared.json("deploy", model, "--name", "ppair", "--transformer", script)[
        "changed"] is False
    base = d["url"] + "/v2/models/ppair"
    with httpx.Client() as c:
        assert len(outputs(ask(c, base + "/infer", 42))["product_ids"]) == 3
        assert len(outputs(ask(c, base + "/versions/1/infer", 42))["product_ids"]) == 5
        assert len(outputs(ask(c, base + "/versions/2/infer", 42))["product_ids"]) == 3
        shared.ok("rollback", "ppair")
        r = ask(c, base + "/infer", 42)
        assert r.json()["model_version"] == "1"
        assert outputs(r)["product_ids"] == expected(recs, 42, k=5)[0]  # the old script
    rows = shared.json("versions", "ppair")
    assert [v["transformer"]["script"] for v in rows] == ["recs.py", "recs.py"]
    assert rows[0]["transformer"]["sha256"] == one["transformer"]["sha256"]
    table = shared.ok("versions", "ppair").stdout
    assert "TRANSFORMER" in table and f"recs.py {one['transformer']['sha256'][:12]}" in table
    assert f"transformer: recs.py {one['transformer']['sha256'][:12]}" in \
        shared.ok("status", "ppair").stdout  # the active version's, after the rollback
    history = shared.json("history", "ppair")
    deploys = [e for e in history if e["action"] == "deploy"]
    assert all("transformer recs.py" in e["detail"] and e["actor"] for e in deploys)
    assert one["transformer"]["sha256"][:12] in " ".join(e["detail"] for e in deploys)
    err = shared.fail("export", "kserve", "ppair", "--artifact", tmp_path / "art", "--image",
                      "registry.example.com/mserve:1")
    assert "runs transformer recs.py; exporting a pipeline is not supported" in err, err
    # without --transformer, the same model is another version again: the pair changed
    three = shared.json("deploy", model, "--name", "ppair")
    assert three["changed"] is True and three["transformer"] is None
    shared.ok("undeploy", "ppair")


def test_a_changed_data_file_beside_the_script_is_a_new_version(shared, recs):
    model, script = recs / "model.onnx", recs / "recs.py"
    shared.json("deploy", model, "--name", "pdata", "--transformer", script)
    (recs / "__pycache__").mkdir()
    (recs / "__pycache__" / "recs.cpython.pyc").write_bytes(b"junk")
    (recs / ".notes").write_text("hidden files are not part of the version")
    assert shared.json("deploy", model, "--name", "pdata", "--transformer", script)[
        "changed"] is False
    with sqlite3.connect(recs / "features.sqlite") as db:
        db.execute("UPDATE user_features SET f0 = f0 + 100 WHERE user_id = 42")
    db.close()
    again = shared.json("deploy", model, "--name", "pdata", "--transformer", script)
    assert again["changed"] is True and again["version"] == 2
    with httpx.Client() as c:
        url = again["deployment"]["url"] + "/v2/models/pdata/infer"
        assert outputs(ask(c, url, 42))["product_ids"] == expected(recs, 42)[0]
    shared.ok("undeploy", "pdata")


def test_grpc_goes_through_the_transformer(shared, recs):
    d = shared.json("deploy", recs / "model.onnx", "--name", "pgrpc", "--transformer",
                    recs / "recs.py")["deployment"]
    client = tg.InferenceServerClient(d["grpc_url"])
    meta = client.get_model_metadata("pgrpc", as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["user_id"]
    given = tg.InferInput("user_id", [2], "INT64")
    given.set_data_from_numpy(np.array([42, 7], dtype=np.int64))
    result = client.infer("pgrpc", [given])
    ids = result.as_numpy("product_ids")
    assert ids.shape == (2, 5)
    assert [v.decode() for v in ids[0]] == expected(recs, 42)[0]
    assert [v.decode() for v in ids[1]] == expected(recs, 7)[0]
    missing = tg.InferInput("user_id", [1], "INT64")
    missing.set_data_from_numpy(np.array([99999], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="unknown user id 99999"):
        client.infer("pgrpc", [missing])
    client.close()
    shared.ok("undeploy", "pgrpc")


def test_bytes_user_ids_with_a_script_that_declares_bytes(shared, recs):
    variant(recs, '"datatype": "INT64", "shape": [-1]', '"datatype": "BYTES", "shape": [-1]')
    variant(recs, "np.array([1], dtype=np.int64)", "np.array([b'1'], dtype=object)")
    d = shared.json("deploy", recs / "model.onnx", "--name", "pbytes", "--transformer",
                    recs / "recs.py")["deployment"]
    with httpx.Client() as c:
        got = outputs(ask(c, d["url"] + "/v2/models/pbytes/infer", "42", "BYTES"))
        assert got["product_ids"] == expected(recs, 42)[0]
    shared.ok("undeploy", "pbytes")


def test_a_missing_or_oversized_transformer_is_refused_with_a_clear_message(shared, recs):
    message = shared.fail("deploy", recs / "model.onnx", "--name", "pbig", "--transformer",
                          recs / "nope.py")
    assert "transformer" in message and "nope.py" in message and "does not exist" in message
    with open(recs / "big.bin", "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB beside the script, past the cap with it
    message = shared.fail("deploy", recs / "model.onnx", "--name", "pbig", "--transformer",
                          recs / "recs.py")
    assert "more than 64 MiB" in message and "MSERVE_TRANSFORMER_MAX_MB" in message, message
    assert all(d["name"] != "pbig" for d in shared.json("list"))


def test_serve_runs_the_transformer_in_the_foreground(recs, tmp_path):
    from tests.conftest import wait_for
    from tests.test_e2e_serve import Served, free_ports

    port, grpc_port = free_ports(2)
    served = Served([sys.executable, "-m", "mserve.cli.main", "serve", str(recs / "model.onnx"),
                     "--name", "srecs", "--transformer", str(recs / "recs.py"), "--host",
                     "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)],
                    port, tmp_path / "serve.log")
    try:
        wait_for(served.ready, timeout=60, what="mserve serve ready")
        with httpx.Client() as c:
            got = outputs(ask(c, served.url + "/v2/models/srecs/infer", 42))
            assert got["product_ids"] == expected(recs, 42)[0]
    finally:
        served.stop()


HEADER_SCRIPT = '''
class Transformer:
    def preprocess(self, inputs, headers):
        return {"x": inputs["x"] * float(headers.get("x-scale", "1"))}
'''


def test_preprocess_sees_the_request_headers_over_http_and_grpc(shared, tmp_path, affine_v1):
    script = tmp_path / "scaled.py"
    script.write_text(HEADER_SCRIPT)
    d = shared.json("deploy", affine_v1, "--name", "pheaders", "--transformer",
                    script)["deployment"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    r = httpx.post(d["url"] + "/v2/models/pheaders/infer", json=body, headers={"X-Scale": "3"})
    assert r.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
    client = tg.InferenceServerClient(d["grpc_url"])
    given = tg.InferInput("x", [1, 4], "FP32")
    given.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    result = client.infer("pheaders", [given], headers={"x-scale": "2"})
    assert result.as_numpy("y").tolist() == [[2.0, 4.0, 6.0, 8.0]]
    client.close()
    shared.ok("undeploy", "pheaders")
