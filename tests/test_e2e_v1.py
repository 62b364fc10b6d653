"""TF Serving / KServe V1 through a real daemon and worker: the iris example (a scikit-learn
classifier: INT64 label [N] next to FP32 probabilities [N, 3]) over HTTP and `mserve predict`,
a model with INT64/UINT8/BOOL/FP16 outputs, and outputs that cannot be rows. Last, the image's
en_US.UTF-8 locale, which skl2onnx's text models need."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests import models

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris"


@pytest.fixture(scope="module")
def served(shared, model_dir):
    """name -> (model file, url) on the shared daemon."""
    built = {"v1iris": IRIS / "model.onnx",
             "v1typed": models.typed_outputs(model_dir / "v1typed.onnx"),
             "v1total": models.with_total(model_dir / "v1total.onnx")}
    urls = {name: shared.json("deploy", path, "--name", name)["deployment"]["url"]
            for name, path in built.items()}
    yield {name: (built[name], urls[name]) for name in built}
    for name in built:
        shared.run("undeploy", name)


def run_in_process(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs from onnxruntime itself, the reference for every answer."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_rows_match(predictions: list, outputs: dict[str, np.ndarray]) -> None:
    """One object per row holding each output's row; floats read back as the same value."""
    assert len(predictions) == len(next(iter(outputs.values())))
    for name, array in outputs.items():
        got = [row[name] for row in predictions]
        if array.dtype.kind == "f":
            np.testing.assert_array_equal(np.array(got, dtype=array.dtype), array)
        else:
            assert got == array.tolist(), name


def iris_reference() -> tuple[list, dict[str, np.ndarray]]:
    rows = json.loads((IRIS / "instances.json").read_text())["instances"]
    features = np.array(rows, dtype=np.float32)
    return rows, run_in_process(IRIS / "model.onnx", {"features": features})


def test_iris_instances_over_http(served):
    _, url = served["v1iris"]
    rows, want = iris_reference()
    assert want["label"].tolist() == [0, 1, 2]  # examples/iris/README.md
    r = httpx.post(url + "/v1/models/v1iris:predict",
                   content=(IRIS / "instances.json").read_bytes())
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    assert set(r.json()) == {"predictions"}
    assert_rows_match(r.json()["predictions"], want)
    named = {"instances": [{"features": row} for row in rows]}
    r = httpx.post(url + "/v1/models/v1iris/versions/1:predict", json=named)
    assert r.status_code == 200, r.text
    assert_rows_match(r.json()["predictions"], want)
    r = httpx.post(url + "/v1/models/v1iris:predict", json={"inputs": rows})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert outputs["label"] == want["label"].tolist()
    np.testing.assert_array_equal(np.array(outputs["probabilities"], np.float32),
                                  want["probabilities"])


def test_iris_instances_with_mserve_predict(served, shared):
    _, want = iris_reference()
    instances = IRIS / "instances.json"
    as_json = shared.json("predict", "v1iris", instances)
    assert set(as_json) == {"predictions"}
    assert_rows_match(as_json["predictions"], want)
    printed = shared.ok("predict", "v1iris", instances).stdout
    assert json.loads(printed) == as_json
    pinned = shared.json("predict", "v1iris", instances, "--version", "1")
    assert pinned == as_json
    piped = shared.json("predict", "v1iris", "-", input=instances.read_text())
    assert piped == as_json


def test_int64_uint8_bool_fp16_outputs(served):
    path, url = served["v1typed"]
    rows = [[0.5, -2.0, 3.25], [-1.0, -0.1, -3.0], [7.0, 8.5, 0.0], [0.1, 0.2, 0.3]]
    want = run_in_process(path, {"x": np.array(rows, dtype=np.float32)})
    assert {name: a.dtype.name for name, a in want.items()} == {
        "label": "int64", "code": "uint8", "positive": "bool", "half": "float16"}
    r = httpx.post(url + "/v1/models/v1typed:predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    assert_rows_match(r.json()["predictions"], want)
    r = httpx.post(url + "/v1/models/v1typed:predict", json={"inputs": {"x": rows}})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert outputs["label"] == want["label"].tolist()
    assert outputs["code"] == want["code"].tolist()
    assert outputs["positive"] == want["positive"].tolist()
    np.testing.assert_array_equal(np.array(outputs["half"], np.float16), want["half"])


def test_outputs_without_a_shared_batch_are_a_clear_400(served):
    """As TF Serving ("Tensor name: total has inconsistent batch size"): rows are refused with
    400 and the columnar form answers; the worker keeps serving."""
    _, url = served["v1total"]
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]
    r = httpx.post(url + "/v1/models/v1total:predict", json={"instances": rows})
    assert r.status_code == 400, r.text
    assert r.headers["x-model-version"] == "1"
    message = r.json()["error"]
    assert "output 'total' is a scalar" in message and '{"inputs": ...}' in message
    assert "Traceback" not in r.text
    r = httpx.post(url + "/v1/models/v1total:predict", json={"inputs": rows})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == {"y": rows, "total": 12.0}


def test_the_image_has_the_en_us_utf8_locale(tmp_path):
    """ONNX Runtime's StringNormalizer (skl2onnx's TfidfVectorizer) fails to load without
    en_US.UTF-8: the build stage compiles it and the final stage copies the archive. Where
    this machine can, the Dockerfile's own localedef line is run into a scratch prefix."""
    text = (ROOT / "Dockerfile").read_text()
    build = text.split(" AS build\n", 1)[1].split("\nFROM ", 1)[0]
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"apt-get install -y --no-install-recommends locales\b", build)
    assert "COPY --from=build /usr/lib/locale/locale-archive /usr/lib/locale/locale-archive" \
        in final
    command = shlex.split(re.search(r"localedef [^\\\n&]+", build).group(0))
    assert command[-1] == "en_US.UTF-8" and "en_US" in command and "UTF-8" in command
    sources = [Path("/usr/share/i18n/locales/en_US"), Path("/usr/share/locale/locale.alias")]
    if shutil.which("localedef") is None or not all(p.exists() for p in sources):
        pytest.skip("this machine has no localedef or no en_US locale sources")
    (tmp_path / "usr" / "lib" / "locale").mkdir(parents=True)
    prefix = ["localedef", f"--prefix={tmp_path}"]
    subprocess.run(prefix + command[1:], check=True, capture_output=True, timeout=60)
    listed = subprocess.run(prefix + ["--list-archive"], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()
    assert "en_US.utf8" in listed
