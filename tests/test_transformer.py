"""The transformer loader (worker/transformer.py), its warm-up in runtime.load, and how the
store takes a script's folder into a version's artifact and its hash."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from mserve.daemon.errors import BadRequest, DeployFailed
from mserve.daemon.store import TRANSFORMER_DIR, Store
from mserve.daemon.worker import runtime, transformer
from mserve.daemon.protocol.tensors import TensorSpec
from tests import models

X = [TensorSpec("x", "FP32", (-1, 4))]
Y = [TensorSpec("y", "FP32", (-1, 4))]

GOOD = '''
import os
import numpy as np

LOADED = []

class Transformer:
    inputs = [{"name": "ids", "datatype": "INT64", "shape": [-1]}]

    def __init__(self, context):
        self.context = context
        LOADED.append(context.version)
        with open(os.path.join(context.folder, "offset.txt")) as f:
            self.offset = float(f.read())

    def preprocess(self, inputs, headers):
        if (inputs["ids"] < 0).any():
            raise ValueError("ids must not be negative")
        return {"x": np.repeat(inputs["ids"][:, None], 4, axis=1) + self.offset}

    async def postprocess(self, outputs, inputs):
        return {"y": outputs["y"], "who": [headers_seen for headers_seen in ["ok"]]}

    def sample(self):
        return {"ids": np.array([1], dtype=np.int64)}
'''


def script(folder: Path, text: str = GOOD, name: str = "t.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "offset.txt").write_text("0.5")
    path = folder / name
    path.write_text(text)
    return path


def test_load_makes_the_transformer_with_its_context_and_declared_signature(tmp_path):
    p = transformer.load(str(script(tmp_path)), 3, X, Y)
    assert p.name == "t.py" and p.pre is not None and p.post is not None
    assert p.inputs == [TensorSpec("ids", "INT64", (-1,))] and p.outputs is None
    ctx = p.instance.context
    assert ctx.folder == str(tmp_path) and ctx.version == 3
    assert ctx.inputs == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert isinstance(ctx.logger, logging.Logger)
    assert p.meta() == {"script": "t.py", "preprocess": True, "postprocess": True,
                        "own_signature": True}


def test_each_version_imports_its_own_module(tmp_path):
    path = str(script(tmp_path))
    one, two = transformer.load(path, 1, X, Y), transformer.load(path, 2, X, Y)
    module_one = type(one.instance).__module__
    assert module_one != type(two.instance).__module__
    import sys

    assert sys.modules[module_one].LOADED == [1]  # not shared with version 2's module


def test_preprocess_runs_in_the_pool_and_its_error_is_a_400_with_the_scripts_message(tmp_path):
    p = transformer.load(str(script(tmp_path)), 1, X, Y)

    async def go():
        feeds = await p.preprocess({"ids": np.array([2, 3])}, {}, X)
        assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (2, 4)
        assert feeds["x"][1, 0] == 3.5
        with pytest.raises(BadRequest, match="^ids must not be negative$"):
            await p.preprocess({"ids": np.array([-1])}, {}, X)
        out = await p.postprocess({"y": np.zeros((1, 4), np.float32)}, {})
        assert out["who"].dtype == object and list(out["who"]) == ["ok"]

    asyncio.run(go())


def test_feeds_missing_a_model_input_are_the_scripts_fault(tmp_path):
    with pytest.raises(transformer.TransformerFailed, match="returned no 'x'") as info:
        transformer.check_feeds("t.py", {"z": [1]}, X)
    assert info.value.status == 500
    with pytest.raises(transformer.TransformerFailed, match="must return a dict"):
        transformer.check_feeds("t.py", [1, 2], X)


@pytest.mark.parametrize("text, words", [
    ("raise RuntimeError('no database')", "failed to import: no database"),
    ("import sys\nsys.exit(3)", "failed to import: 3"),
    ("x = 1", "defines no class Transformer"),
    ("class Transformer:\n    def __init__(self, context):\n        raise KeyError('cfg')",
     "__init__ failed: 'cfg'"),
    ("class Transformer:\n    inputs = [{'name': 'a'}]", "'inputs' must be a list of"),
    ("class Transformer:\n    inputs = [{'name': 'a', 'datatype': 'FLOAT', 'shape': [1]}]",
     "unknown datatype 'FLOAT'"),
])
def test_a_bad_script_is_refused_in_its_own_words(tmp_path, text, words):
    with pytest.raises(DeployFailed) as info:
        transformer.load(str(script(tmp_path, text)), 1, X, Y)
    assert words in info.value.message
    assert "t.py" in info.value.message


def test_runtime_load_runs_the_pipeline_once_and_serves_its_signature(tmp_path):
    model = models.affine(tmp_path / "m" / "model.onnx")
    loaded = runtime.load(1, str(model), transformer=str(script(tmp_path / "t")))
    assert loaded.inputs == [TensorSpec("ids", "INT64", (-1,))]
    assert loaded.graph_inputs == X and loaded.outputs == loaded.graph_outputs == Y
    assert loaded.meta()["transformer"]["model_inputs"] == [x.to_json() for x in X]
    plain = runtime.load(1, str(model))
    assert plain.pipeline is None and "transformer" not in plain.meta()


def test_a_failing_warm_up_refuses_the_version(tmp_path):
    model = models.affine(tmp_path / "m" / "model.onnx")
    text = GOOD.replace('np.array([1], dtype=np.int64)', 'np.array([-5], dtype=np.int64)')
    with pytest.raises(DeployFailed, match="failed its warm-up run in preprocess: ids must not"):
        runtime.load(1, str(model), transformer=str(script(tmp_path / "t", text)))
    wrong = GOOD.replace('return {"x"', 'return {"q"')
    with pytest.raises(DeployFailed, match="warm-up run in preprocess: .*returned no 'x'"):
        runtime.load(1, str(model), transformer=str(script(tmp_path / "w", wrong)))


def test_without_a_sample_the_warm_up_uses_zeros_of_the_signature(tmp_path):
    model = models.affine(tmp_path / "m" / "model.onnx")
    text = "class Transformer:\n    def preprocess(self, inputs, headers):\n" \
           "        assert inputs['x'].shape == (1, 4) and not inputs['x'].any()\n" \
           "        return inputs\n"
    loaded = runtime.load(1, str(model), transformer=str(script(tmp_path / "t", text)))
    assert loaded.pipeline.post is None and loaded.inputs == X


# ---- the store ----------------------------------------------------------------------


def test_the_artifact_holds_the_script_folder_and_its_hash_covers_the_pair(tmp_path):
    store = Store(tmp_path / "store")
    model = models.affine(tmp_path / "m" / "model.onnx")
    folder = tmp_path / "t"
    path = script(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "t.pyc").write_bytes(b"x")
    (folder / ".secret").write_text("left out")
    (folder / "data").mkdir()
    (folder / "data" / "vocab.txt").write_text("a b c")
    plain = store.ingest(model)
    first = store.ingest(model, transformer=path)
    assert first.sha256 != plain.sha256 and first.transformer.model_sha256 == plain.sha256
    stored = sorted(p.relative_to(store.root / first.sha256 / TRANSFORMER_DIR).as_posix()
                    for p in (store.root / first.sha256 / TRANSFORMER_DIR).rglob("*")
                    if p.is_file())
    assert stored == ["data/vocab.txt", "offset.txt", "t.py"]
    assert store.script_of({"sha256": first.sha256, "transformer": first.transformer.to_json()}
                           ) == str(store.root / first.sha256 / TRANSFORMER_DIR / "t.py")
    assert store.ingest(model, transformer=path).sha256 == first.sha256  # idempotent
    (folder / ".secret").write_text("changed, still left out")
    assert store.ingest(model, transformer=path).sha256 == first.sha256
    (folder / "data" / "vocab.txt").write_text("a b c d")
    data = store.ingest(model, transformer=path)
    assert data.sha256 != first.sha256 and data.transformer.sha256 != first.transformer.sha256
    other = folder / "u.py"
    other.write_text(path.read_text())
    assert store.ingest(model, transformer=other).sha256 != data.sha256  # another script


def test_the_store_refuses_what_a_transformer_cannot_be(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    model = models.affine(tmp_path / "m" / "model.onnx")
    with pytest.raises(BadRequest, match="does not exist"):
        store.ingest(model, transformer=tmp_path / "none.py")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadRequest, match="must be a Python file"):
        store.ingest(model, transformer=tmp_path / "notes.txt")
    path = script(tmp_path / "t")
    (tmp_path / "t" / "big.bin").write_bytes(b"\0" * 3 * 2**20)
    monkeypatch.setenv("MSERVE_TRANSFORMER_MAX_MB", "2")
    with pytest.raises(BadRequest, match="more than 2 MiB"):
        store.ingest(model, transformer=path)
    reserved = tmp_path / "folder"
    (reserved / TRANSFORMER_DIR).mkdir(parents=True)
    (reserved / TRANSFORMER_DIR / "x.py").write_text("")
    models.affine(reserved / "model.onnx")
    with pytest.raises(BadRequest, match="a name mserve keeps for transformers"):
        store.ingest(reserved)


def test_a_script_inside_a_model_folder_keeps_its_data_but_not_the_model(tmp_path):
    store = Store(tmp_path / "store")
    folder = tmp_path / "both"
    path = script(folder)
    models.affine(folder / "model.onnx")
    artifact = store.ingest(folder, transformer=path)
    tree = store.root / artifact.sha256 / TRANSFORMER_DIR
    assert sorted(p.name for p in tree.iterdir()) == ["offset.txt", "t.py"]
    assert (store.root / artifact.sha256 / "model.onnx").is_file()
