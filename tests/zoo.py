"""A zoo of models shaped like real exporters write them, built at test time (never
downloaded), each with a maker of random requests of a given size.

scikit-learn pipelines are converted with skl2onnx (ZipMap, ColumnTransformer with two
inputs, a Tfidf text classifier). PyTorch-style graphs (a time-major GRU, a detector with
a data-dependent NonZero output, a fixed-shape CNN, a dynamically quantized layer) are
written with the onnx helper API in the layout torch.onnx.export gives, because PyTorch is
too heavy for the test extras. The "size" of a request is its rows, or its sequence length
where dim 0 is time. test_e2e_zoo.py serves them all and compares every answer with
ONNX Runtime run in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import OPSET, _save

SKL_OPSET = {"": 17, "ai.onnx.ml": 3}
FALLBACK_LOCALE = "C.UTF-8"  # what mserve gives StringNormalizer where en_US is missing
CITIES = ["paris", "oslo", "lima", "kyoto"]
MUST, IF_BATCHABLE = "must", "if batchable"  # Model.batching
WORDS = ["good", "great", "fine", "bad", "awful", "boring", "film", "plot", "Acting", "MUSIC"]


@dataclass(frozen=True)
class Request:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None = None  # None: every output


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[Path], Path]  # writes the model under a folder; what to deploy
    request: Callable[[np.random.Generator, int], Request]
    sizes: tuple[int, ...] = (1, 2, 3, 4)
    batching: str = ""  # MUST: concurrent requests share runs; IF_BATCHABLE: when declared so
    maps: frozenset[str] = frozenset()  # ZipMap outputs, served as JSON text per row


def _floats(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.normal(size=shape).astype(dtype)


# ---- scikit-learn through skl2onnx -------------------------------------------------------

def _convert(pipeline, initial_types, path: Path, options=None) -> Path:
    from skl2onnx import convert_sklearn

    model = convert_sklearn(pipeline, initial_types=initial_types, target_opset=SKL_OPSET,
                            options=options)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _training(seed: int = 0, rows: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = _floats(rng, rows, 4)
    return x, (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)


def logreg(folder: Path) -> Path:
    """StandardScaler + LogisticRegression, 3 integer classes, ZipMap kept (the default)."""
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(*_training())
    return _convert(pipeline, [("features", FloatTensorType([None, 4]))],
                    folder / "logreg.onnx")


def forest(folder: Path) -> Path:
    """A small RandomForest with string class labels, ZipMap kept (string keys)."""
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    x, y = _training(1)
    labels = np.array(["low", "mid", "high"])[y]
    model = RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0).fit(x, labels)
    return _convert(model, [("features", FloatTensorType([None, 4]))], folder / "forest.onnx")


def feature_request(rng: np.random.Generator, size: int) -> Request:
    return Request({"features": _floats(rng, size, 4)})


def columns(folder: Path) -> Path:
    """ColumnTransformer: OneHotEncoder on a string input, StandardScaler on a numeric one
    (two ONNX inputs), then LogisticRegression without ZipMap."""
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(2)
    city, num = rng.choice(CITIES[:3], 150), _floats(rng, 150, 2)
    table = np.empty((150, 3), dtype=object)
    table[:, 0], table[:, 1:] = city, num
    prep = ColumnTransformer([("city", OneHotEncoder(handle_unknown="ignore"), [0]),
                              ("num", StandardScaler(), [1, 2])])
    clf = LogisticRegression()
    pipeline = Pipeline([("prep", prep), ("clf", clf)])
    pipeline.fit(table, (num[:, 0] + (city == "oslo") > 0.3).astype(int))
    return _convert(pipeline, [("city", StringTensorType([None, 1])),
                               ("num", FloatTensorType([None, 2]))],
                    folder / "columns.onnx", options={id(clf): {"zipmap": False}})


def columns_request(rng: np.random.Generator, size: int) -> Request:
    city = rng.choice(CITIES, (size, 1)).astype(object)  # "kyoto" was never seen: ignored
    return Request({"city": city, "num": _floats(rng, size, 2)})


def tfidf(folder: Path) -> Path:
    """TfidfVectorizer + LogisticRegression on a [None, 1] string input, ZipMap kept. Its
    StringNormalizer asks for the en_US.UTF-8 locale (see reference_session)."""
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS, 5)) for _ in range(120)]
    labels = [int(sum(w.lower() in ("good", "great", "fine") for w in t.split()) > 1)
              for t in texts]
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, labels)
    return _convert(pipeline, [("text", StringTensorType([None, 1]))], folder / "tfidf.onnx")


def tfidf_request(rng: np.random.Generator, size: int) -> Request:
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 8)))) for _ in range(size)]
    return Request({"text": np.array(texts, dtype=object).reshape(size, 1)})


# ---- PyTorch-style graphs with the onnx helper API ---------------------------------------

def _weights(seed: int, *shape: int, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * 0.4).astype(dtype)


GRU_FEATURES, GRU_HIDDEN = 4, 8
SEQ, BATCH = "input_dynamic_axes_1", "input_dynamic_axes_2"  # torch's names for dynamic_axes


def gru(folder: Path) -> Path:
    """nn.GRU(4, 8) exported time-major: input [seq, batch, 4]; Y [seq, 1, batch, 8] and
    Y_h [1, batch, 8]. Dim 0 is time: rows of two requests must never be joined."""
    h = GRU_HIDDEN
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [SEQ, BATCH, GRU_FEATURES])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [SEQ, 1, BATCH, h])
    y_h = helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, BATCH, h])
    inits = [numpy_helper.from_array(_weights(10, 1, 3 * h, GRU_FEATURES), "W"),
             numpy_helper.from_array(_weights(11, 1, 3 * h, h), "R"),
             numpy_helper.from_array(_weights(12, 1, 6 * h) * 0.1, "B")]
    node = helper.make_node("GRU", ["input", "W", "R", "B"], ["Y", "Y_h"], name="GRU_0",
                            hidden_size=h, linear_before_reset=1)
    return _save(helper.make_graph([node], "torch_jit", [x], [y, y_h], inits),
                 folder / "gru.onnx")


def gru_output(folder: Path) -> Path:
    """A forward that returns ``self.gru(x)[0]``: the GRU, then torch's Squeeze of Y's
    direction axis, output [seq, batch, 8] alone. Every dim lines up with the input's, so
    only running it can show that dim 0 is time."""
    h = GRU_HIDDEN
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [SEQ, BATCH, GRU_FEATURES])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [SEQ, BATCH, h])
    inits = [numpy_helper.from_array(_weights(13, 1, 3 * h, GRU_FEATURES), "W"),
             numpy_helper.from_array(_weights(14, 1, 3 * h, h), "R"),
             numpy_helper.from_array(_weights(15, 1, 6 * h) * 0.1, "B"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("GRU", ["input", "W", "R", "B"], ["Y"], name="GRU_0",
                              hidden_size=h, linear_before_reset=1),
             helper.make_node("Squeeze", ["Y", "axes"], ["output"])]
    return _save(helper.make_graph(nodes, "torch_jit", [x], [out], inits),
                 folder / "gru_output.onnx")


def gru_output_request(rng: np.random.Generator, size: int) -> Request:
    return Request({"input": _floats(rng, size, int(rng.integers(1, 3)), GRU_FEATURES)})


def gru_request(rng: np.random.Generator, size: int) -> Request:
    """``size`` time steps of 1 or 2 sequences; every other request asks for Y alone (as a
    caller of ``output, _ = gru(x)`` would)."""
    batch = int(rng.integers(1, 3))
    outputs = ("Y",) if rng.integers(2) else None
    return Request({"input": _floats(rng, size, batch, GRU_FEATURES)}, outputs)


def detector(folder: Path) -> Path:
    """torch.nonzero(x == x.max(1, keepdim=True)) and x.max(1): detections [K, 2] (row,
    class) whose K is data-dependent, and a per-row score [batch]."""
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["logits_dynamic_axes_1", 5])
    det = helper.make_tensor_value_info("detections", TensorProto.INT64,
                                        ["Transposedetections_dim_0", 2])
    score = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["logits_dynamic_axes_1"])
    nodes = [helper.make_node("ReduceMax", ["logits"], ["best"], axes=[1], keepdims=1),
             helper.make_node("Equal", ["logits", "best"], ["hit"]),
             helper.make_node("NonZero", ["hit"], ["where"]),
             helper.make_node("Transpose", ["where"], ["detections"], perm=[1, 0]),
             helper.make_node("ReduceMax", ["logits"], ["scores"], axes=[1], keepdims=0)]
    return _save(helper.make_graph(nodes, "torch_jit", [x], [det, score]),
                 folder / "detector.onnx")


def detector_request(rng: np.random.Generator, size: int) -> Request:
    return Request({"logits": _floats(rng, size, 5)})


def fixed_cnn(folder: Path) -> Path:
    """Conv + Relu + GlobalAveragePool + Flatten exported without dynamic axes:
    input [1, 3, 8, 8] -> output [1, 4]."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(_weights(20, 4, 3, 3, 3), "conv.weight"),
             numpy_helper.from_array(_weights(21, 4), "conv.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"],
                              pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["output"], axis=1)]
    return _save(helper.make_graph(nodes, "torch_jit", [x], [y], inits),
                 folder / "fixed_cnn.onnx")


def fixed_request(rng: np.random.Generator, size: int) -> Request:
    return Request({"input": _floats(rng, 1, 3, 8, 8)})


def _mlp_graph(name: str, dims: tuple[int, int, int], dtype=np.float32, seed: int = 30,
               batch: str = "batch"):
    """x [batch, a] -> Relu(x @ W1 + b1) @ W2 + b2 -> y [batch, c] (torch's nn.Sequential)."""
    a, b, c = dims
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, [batch, a])
    y = helper.make_tensor_value_info("y", elem, [batch, c])
    inits = [numpy_helper.from_array(_weights(seed, a, b, dtype=dtype), "fc1.weight"),
             numpy_helper.from_array(_weights(seed + 1, b, dtype=dtype), "fc1.bias"),
             numpy_helper.from_array(_weights(seed + 2, b, c, dtype=dtype), "fc2.weight"),
             numpy_helper.from_array(_weights(seed + 3, c, dtype=dtype), "fc2.bias")]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
             helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"]),
             helper.make_node("Add", ["h3", "fc2.bias"], ["y"])]
    return helper.make_graph(nodes, name, [x], [y], inits)


def mlp(folder: Path) -> Path:
    """The control: a plain MLP, dims named 'batch' in and out. It must batch."""
    return _save(_mlp_graph("mlp", (8, 16, 3)), folder / "mlp.onnx")


def fp16(folder: Path) -> Path:
    """The same MLP in half precision (as model.half() exports it)."""
    return _save(_mlp_graph("fp16", (8, 16, 4), np.float16, seed=40), folder / "fp16.onnx")


def mlp_request(width: int, dtype=np.float32):
    return lambda rng, size: Request({"x": _floats(rng, size, width, dtype=dtype)})


def external(folder: Path) -> Path:
    """An MLP whose weights live in external data: a folder with model.onnx and
    model.onnx.data (what torch writes past 2 GB), deployed as the folder."""
    model = helper.make_model(_mlp_graph("external", (16, 32, 4), seed=50),
                              opset_imports=OPSET, producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model)
    target = folder / "external"
    target.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    return target


def masks(folder: Path) -> Path:
    """BOOL and UINT8 in and out: masked = where(mask, pixels, 0), bright = mask & (pixels
    > 127)."""
    dims = ["batch", 6]
    inputs = [helper.make_tensor_value_info("mask", TensorProto.BOOL, dims),
              helper.make_tensor_value_info("pixels", TensorProto.UINT8, dims)]
    outputs = [helper.make_tensor_value_info("masked", TensorProto.UINT8, dims),
               helper.make_tensor_value_info("bright", TensorProto.BOOL, dims)]
    inits = [numpy_helper.from_array(np.array(0, np.uint8), "zero"),
             numpy_helper.from_array(np.array(127, np.uint8), "threshold")]
    nodes = [helper.make_node("Where", ["mask", "pixels", "zero"], ["masked"]),
             helper.make_node("Greater", ["pixels", "threshold"], ["high"]),
             helper.make_node("And", ["mask", "high"], ["bright"])]
    return _save(helper.make_graph(nodes, "masks", inputs, outputs, inits),
                 folder / "masks.onnx")


def masks_request(rng: np.random.Generator, size: int) -> Request:
    return Request({"mask": rng.integers(0, 2, (size, 6)).astype(bool),
                    "pixels": rng.integers(0, 256, (size, 6)).astype(np.uint8)})


def quantized(folder: Path) -> Path:
    """A Linear(8, 4) as onnxruntime's quantize_dynamic writes it: DynamicQuantizeLinear
    (one scale for the whole input tensor) -> MatMulInteger -> Cast -> Mul by the scales.
    Each answer depends on which rows share the run."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 4])
    weights = np.random.default_rng(60).integers(0, 256, (8, 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(weights, "fc.weight_quantized"),
             numpy_helper.from_array(np.array(128, np.uint8), "fc.weight_zero_point"),
             numpy_helper.from_array(np.array(0.01, np.float32), "fc.weight_scale")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["input"],
                              ["input_q", "input_scale", "input_zero_point"]),
             helper.make_node("MatMulInteger", ["input_q", "fc.weight_quantized",
                                                "input_zero_point", "fc.weight_zero_point"],
                              ["product"]),
             helper.make_node("Cast", ["product"], ["product_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["input_scale", "fc.weight_scale"], ["scale"]),
             helper.make_node("Mul", ["product_f", "scale"], ["output"])]
    return _save(helper.make_graph(nodes, "quantized", [x], [y], inits),
                 folder / "quantized.onnx")


def quantized_request(rng: np.random.Generator, size: int) -> Request:
    """Rows of different magnitudes: a run's scale follows its largest row."""
    scale = rng.choice([0.1, 1.0, 10.0], (size, 1)).astype(np.float32)
    return Request({"input": _floats(rng, size, 8) * scale})


ZIPMAP = frozenset({"output_probability"})
ZOO = [
    Model("skl-logreg", logreg, feature_request, batching=IF_BATCHABLE, maps=ZIPMAP),
    Model("skl-forest", forest, feature_request, batching=IF_BATCHABLE, maps=ZIPMAP),
    Model("skl-columns", columns, columns_request, batching=IF_BATCHABLE),
    Model("skl-tfidf", tfidf, tfidf_request, batching=IF_BATCHABLE, maps=ZIPMAP),
    Model("torch-gru", gru, gru_request, sizes=(5, 7)),
    Model("torch-gru-output", gru_output, gru_output_request, sizes=(5, 7)),
    Model("torch-detector", detector, detector_request),
    Model("torch-fixed", fixed_cnn, fixed_request, sizes=(1,)),
    Model("torch-fp16", fp16, mlp_request(8, np.float16)),
    Model("masks", masks, masks_request),
    Model("external", external, mlp_request(16)),
    Model("quantized", quantized, quantized_request),
    Model("mlp", mlp, mlp_request(8), batching=MUST),
]


def reference_session(path: Path):
    """ONNX Runtime in-process on the model as built, with StringNormalizer's locale set
    to C.UTF-8 (the same case mapping as en_US.UTF-8, which this machine may lack)."""
    import onnxruntime as ort

    file = path / "model.onnx" if path.is_dir() else path
    model = onnx.load(str(file))
    normalizers = [n for n in model.graph.node if n.op_type == "StringNormalizer"]
    if not normalizers:
        return ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    for node in normalizers:
        kept = [a for a in node.attribute if a.name != "locale"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("locale", FALLBACK_LOCALE)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
