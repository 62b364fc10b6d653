"""Real exporters' files deploy as users hold them: a ``cnn.onnx`` next to its
``cnn.onnx.data``, a folder holding them with no model.onnx, torch 2.x's ``model.onnx`` +
``model.onnx.data``. Each answer is checked against ONNX Runtime run here on the same
input, after the sources are deleted (the store holds its own copy)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.test_store import ROWS, answer, exported

pytestmark = pytest.mark.e2e


def predict(mserve, name: str, tmp_path) -> np.ndarray:
    request = tmp_path / "in.json"
    request.write_text(json.dumps({"x": ROWS.tolist()}))
    out = mserve.json("predict", name, request)["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.mark.parametrize("layout", ["file", "folder", "torch"])
def test_exported_model_deploys_with_its_external_data(shared, model_dir, tmp_path, layout):
    folder = model_dir / f"exp-{layout}"
    if layout == "torch":  # torch.onnx.export in PyTorch 2.x
        model = exported(folder / "model.onnx", location="model.onnx.data", scale=3.0)
    else:
        model = exported(folder / "cnn.onnx", scale={"file": 1.0, "folder": 2.0}[layout])
    source = folder if layout == "folder" else model
    expected = answer(model)
    name = f"exp-{layout}"

    first = shared.json("deploy", source, "--name", name)
    assert first["changed"] is True and first["version"] == 1
    versions = shared.json("versions", name)
    assert [v["sha256"] for v in versions] == [first["sha256"]]
    again = shared.json("deploy", source, "--name", name)
    assert again["changed"] is False and again["sha256"] == first["sha256"]
    assert "nothing changed" in shared.ok("deploy", source, "--name", name).stdout

    shutil.rmtree(folder)  # the store holds its own copy of the model and its data
    np.testing.assert_allclose(predict(shared, name, tmp_path), expected, rtol=1e-6)
    assert len(shared.json("versions", name)) == 1
    shared.ok("undeploy", name)


def test_missing_external_data_is_a_clear_error(shared, model_dir):
    model = exported(model_dir / "exp-missing" / "cnn.onnx")
    (model.parent / "cnn.onnx.data").unlink()
    err = shared.fail("deploy", model, "--name", "exp-missing")
    assert err.startswith("Error: ") and len(err.strip().splitlines()) <= 2, err
    assert (f"'cnn.onnx' references external data 'cnn.onnx.data', which is not next to it "
            f"in '{model.parent}'; keep the .onnx and its data files together") in err
    assert all(d["name"] != "exp-missing" for d in shared.json("list"))
    assert "deployment 'exp-missing' not found" in shared.fail("versions", "exp-missing")
