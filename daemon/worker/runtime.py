"""ONNX Runtime sessions: load, describe, warm up and run one model version.

The only module that imports onnxruntime. Non-tensor outputs (a ZipMap's sequence of maps,
as skl2onnx writes for classifiers) are served as BYTES tensors whose elements are the JSON
text of each map, e.g. ``{"0": 0.9, "1": 0.1}``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from mserve.daemon.errors import BadRequest, DeployFailed, MserveError
from mserve.daemon.worker import batchcheck, devices, graphscan, stringlocale, transformer
from mserve.daemon.protocol.codecs import DTYPES, ORT_TYPES, TensorSpec
from mserve.daemon.protocol.tensors import SLICE_ELEMENTS, pause

_cuda_failed: str | None = None  # why CUDA could not be used in this process: not retried


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


@dataclass
class LoadedModel:
    """One loaded version: its sessions and signature."""

    number: int
    path: str
    sessions: list
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str
    providers: list[str]
    load_ms: float
    json_outputs: frozenset[str] = frozenset()  # outputs that are maps, served as JSON text
    size_bound: bool = False  # run time depends on input sizes only (graphscan.size_bound)
    batching: batchcheck.Decision = batchcheck.Decision(False, "not checked yet")
    notes: list[str] = field(default_factory=list)  # what loading had to work around
    card: int | None = None  # the CUDA card it runs on
    warm_cost: float | None = None  # seconds per input element of a warm run (batcher.py)
    fill: int = 1  # the size given to dynamic dims other than dim 0 in warm-up and checks
    # With a transformer: ``inputs``/``outputs`` are what requests see (its own signature,
    # if it declares one), ``graph_*`` the model's own.
    pipeline: transformer.Pipeline | None = None
    graph_inputs: list[TensorSpec] = field(default_factory=list)
    graph_outputs: list[TensorSpec] = field(default_factory=list)
    _turn: itertools.count = field(default_factory=itertools.count)

    @property
    def batchable(self) -> bool:
        """Requests may share a run (decided at load: batchcheck.py)."""
        return self.batching.batched

    def meta(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "device": self.device,
            "card": self.card,
            "providers": self.providers,
            "batchable": self.batchable,
            "batching": self.batching.to_json(),
            "notes": self.notes,
            "load_ms": round(self.load_ms, 1),
            **({"transformer": {**self.pipeline.meta(),
                                "model_inputs": [s.to_json() for s in self.graph_inputs],
                                "model_outputs": [s.to_json() for s in self.graph_outputs]}}
               if self.pipeline else {}),
        }

    def run(self, feeds: dict[str, np.ndarray], names: list[str],
            session: int | None = None) -> list[np.ndarray]:
        """One blocking ``session.run`` (call it from a thread: ONNX Runtime releases the GIL)."""
        index = next(self._turn) if session is None else session
        session = self.sessions[index % len(self.sessions)]
        feeds = {k: _text(k, v) if v.dtype == object else v for k, v in feeds.items()}
        try:
            results = session.run(names, feeds)
        except Exception as exc:  # ORT raises its own types for bad values (e.g. index out of range)
            raise BadRequest(f"the model could not run on this input: {_short(exc)}") from None
        return [_as_array(r) if n in self.json_outputs else r for n, r in zip(names, results)]


def load(number: int, path: str, device: str = "auto", instances: int = 1,
         threads: int = 0, batching: str = "auto", transformer: str | None = None
         ) -> LoadedModel:
    """Load ``path`` on ``device``, warm it up and decide whether it batches, then load its
    ``transformer`` script and run the pipeline once; raise DeployFailed with a plain
    reason (the script's own words for a script's failure)."""
    devices.parse(device)
    if batching not in batchcheck.MODES:
        raise DeployFailed(f"unknown batching mode {batching!r}: use auto, on or off")
    start = time.perf_counter()
    first, source, notes = _first_session(path, device, threads)
    notes = notes + cuda_note(device)
    sessions = [first] + [_session(source, device, threads) for _ in range(1, instances)]
    providers = list(first.get_providers())
    ops = graphscan.read_operators(path)
    model = LoadedModel(
        number=number, path=path, sessions=sessions,
        inputs=[_spec(a) for a in first.get_inputs()],
        outputs=[_spec(a) for a in first.get_outputs()],
        device="cuda" if devices.CUDA in providers else "cpu", providers=providers,
        load_ms=0.0,
        json_outputs=frozenset(a.name for a in first.get_outputs() if _is_map(a.type)),
        size_bound=graphscan.is_size_bound(ops), notes=notes,
    )
    if model.device == "cuda":
        model.card = devices.parse(device)[1]
    warm_up(model)
    model.batching = _decide_batching(model, first, batching, ops)
    model.warm_cost = _warm_cost(model)
    model.graph_inputs, model.graph_outputs = model.inputs, model.outputs
    if transformer is not None:
        attach(model, transformer)
    model.load_ms = (time.perf_counter() - start) * 1000
    return model


def attach(model: LoadedModel, script: str) -> None:
    """Load ``script`` as the version's transformer and run preprocess, the model and
    postprocess once on its sample; requests then see its signature, if it declares one."""
    pipeline = transformer.load(script, model.number, model.graph_inputs, model.graph_outputs)
    step = "sample"
    try:
        inputs = pipeline.sample(model.graph_inputs, model.fill)
        step = "preprocess"
        feeds = transformer.run_sync(pipeline.pre, inputs, {}) if pipeline.pre else inputs
        feeds = transformer.check_feeds(pipeline.name, feeds, model.graph_inputs)
        step = "the model"
        names = [s.name for s in model.graph_outputs]
        outputs = dict(zip(names, model.run(feeds, names, 0)))
        step = "postprocess"
        if pipeline.post:
            transformer.check_outputs(pipeline.name,
                                      transformer.run_sync(pipeline.post, outputs, inputs))
    except Exception as exc:
        transformer.log_failure(pipeline.name, f"warm-up ({step})", exc)
        text = exc.message if isinstance(exc, MserveError) else transformer.message(exc)
        raise DeployFailed(f"transformer '{pipeline.name}' failed its warm-up run in "
                           f"{step}: {text}") from None
    model.pipeline = pipeline
    model.inputs = pipeline.inputs or model.graph_inputs
    model.outputs = pipeline.outputs or model.graph_outputs


def _decide_batching(model: LoadedModel, session, mode: str, ops) -> batchcheck.Decision:
    names = [s.name for s in model.outputs]
    return batchcheck.decide(
        mode, model.inputs, [list(a.shape or ()) for a in session.get_inputs()],
        model.outputs, [None if _is_map(a.type) else list(a.shape or ())
                        for a in session.get_outputs()],
        {op for _, op in ops or ()}, lambda feeds: model.run(feeds, names, 0),
        model.json_outputs, model.fill)


def _first_session(path: str, device: str, threads: int):
    """The first session, what to load the others from (the file, or for a StringNormalizer
    needing a missing en_US locale an in-memory copy naming C.UTF-8: stringlocale.py), and
    notes on what was worked around."""
    try:
        return _session(path, device, threads), path, []
    except DeployFailed as exc:
        locale = stringlocale.missing_locale(exc.message)
        if locale is None:
            raise
        if not stringlocale.can_substitute(locale):
            raise DeployFailed(stringlocale.hint(locale)) from None
    source = stringlocale.with_fallback_locale(path)
    note = (f"the {locale} locale is missing on this machine: StringNormalizer uses "
            f"{stringlocale.FALLBACK} (the same case mapping)")
    return _session(source, device, threads), source, [note]


def _session(path: str | bytes, device: str, threads: int):
    global _cuda_failed
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    kind, card = devices.parse(device)
    want_cuda = kind == "cuda" or (kind == "auto" and _cuda_failed is None
                                   and devices.CUDA in ort.get_available_providers())
    if want_cuda:
        devices.preload(ort)
        # Missing CUDA libraries make ORT print errors before falling back; keep them quiet.
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(path, options,
                                       providers=devices.providers(
                                           kind if want_cuda else "cpu", card))
    except Exception as exc:
        raise DeployFailed(_load_error(exc, path)) from None
    finally:
        ort.set_default_logger_severity(3)
    if want_cuda and devices.CUDA not in session.get_providers():
        _cuda_failed = devices.why_not_cuda(ort)
        if kind == "cuda":
            raise DeployFailed(f"device '{device}' was asked for but CUDA cannot be used: "
                               f"{_cuda_failed}; use --device auto or cpu")
    return session


def cuda_note(device: str) -> list[str]:
    """What ``auto`` fell back from, for status (empty when it did not)."""
    if _cuda_failed is None or devices.parse(device)[0] != "auto":
        return []
    return [f"CUDA not used ({_cuda_failed}): running on the CPU"]


def _load_error(exc: Exception, path: str | bytes) -> str:
    text = _short(exc)
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        name = Path(path).name if isinstance(path, str) else "the model"
        return f"'{name}' is not a valid ONNX model (it could not be parsed)"
    return f"the model could not be loaded: {text}"


def _short(exc: Exception) -> str:
    """ORT's message without its '[ONNXRuntimeError] : 2 : CODE :' prefix, on one line."""
    text = " ".join(str(exc).split())
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(":", 3)[-1].strip()
    return text[:500]


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """ORT string tensors take str elements (bytes would be stored as "b'...'")."""
    flat, out = array.reshape(-1), np.empty(array.size, dtype=object)
    try:
        for start in range(0, flat.size, SLICE_ELEMENTS):  # a slice per GIL hold
            out[start:start + SLICE_ELEMENTS] = [
                v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in flat[start:start + SLICE_ELEMENTS].tolist()]
            pause()
    except UnicodeDecodeError:
        raise BadRequest(f"input '{name}': BYTES elements must be UTF-8 text for this model's "
                         "string input") from None
    return out.reshape(array.shape)


def _is_map(ort_type: str) -> bool:
    return ort_type.startswith(("seq(map", "map("))


def _spec(arg) -> TensorSpec:
    if _is_map(arg.type):
        return TensorSpec(arg.name, "BYTES", (-1,))
    if arg.type not in ORT_TYPES:
        raise DeployFailed(f"'{arg.name}' has type {arg.type}, which mserve cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, ORT_TYPES[arg.type], shape)


def _as_array(value) -> np.ndarray:
    """A sequence of maps (ZipMap) as a BYTES tensor of JSON objects, one per row."""
    rows = value if isinstance(value, list) else [value]
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = orjson.dumps({str(k): v for k, v in row.items()},
                              option=orjson.OPT_SERIALIZE_NUMPY)
    return out


# Sizes tried for dynamic dims other than dim 0 until a warm-up run works (a CNN exported
# with dynamic height and width cannot run on 1x1 images).
FILL_SIZES = (1, 8, 32, 64, 224)


def warm_up(model: LoadedModel) -> None:
    """Run the model once on zeros (dim 0 = 1, other dynamic dims the first size that runs)
    so the first request is not slow; that size is kept for the batching check."""
    names = [s.name for s in model.outputs]
    dynamic = any(d < 0 for s in model.inputs for d in s.shape[1:])
    for fill in FILL_SIZES if dynamic else FILL_SIZES[:1]:
        feeds = {s.name: _zeros(s, fill) for s in model.inputs}
        try:
            for session in model.sessions:
                session.run(names, feeds)
        except Exception as exc:
            error = exc
            continue
        model.fill = fill
        return
    raise DeployFailed(f"the model loaded but failed its warm-up run: {_short(error)}") \
        from None


def _warm_cost(model: LoadedModel) -> float | None:
    """Seconds per input element of one warm run on the warm-up input: the batcher's first
    estimate of what a request costs (before it has timed any), so a lone request can run
    inline from the first one (a cold run in a fresh thread would overstate it)."""
    feeds = {s.name: _zeros(s, model.fill) for s in model.inputs}
    start = time.perf_counter()
    try:
        model.sessions[0].run([s.name for s in model.outputs], feeds)
    except Exception:
        return None
    return (time.perf_counter() - start) / max(1, sum(a.size for a in feeds.values()))


def _zeros(spec: TensorSpec, fill: int = 1) -> np.ndarray:
    shape = tuple(d if d >= 0 else 1 if i == 0 else fill for i, d in enumerate(spec.shape))
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=DTYPES[spec.datatype])
