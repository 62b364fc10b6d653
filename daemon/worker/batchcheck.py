"""Whether one model version may be batched: decided once, at load, from its graph and a check.

Joining requests along dim 0 is only right when dim 0 *is* a batch: every output row depends
on its own input row alone. Exporters break that in ordinary ways: a time-major RNN (PyTorch's
default ``[seq, batch, features]``), a data-dependent output (NonZero, detections ``[K, 4]``),
a dynamically quantized model whose scale is taken over the whole batch. So a version batches
(``--batching auto``, the default) only when both hold:

- **structure**: every input has a dynamic dim 0 with one shared symbolic name, and every
  output's dim 0 is that same name, or unnamed, in a graph without operators whose output size
  depends on the data;
- **behaviour**: two different requests (one row, two rows) run separately and then joined
  along dim 0 give the same outputs, row for row (within a tight tolerance for floats).

``--batching on`` skips both (the user vouches for the model); ``off`` never batches. The
decision and its reason are part of the version's metadata (``mserve status``, ``list``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from mserve.daemon.protocol.codecs import DTYPES, TensorSpec

MODES = ("auto", "on", "off")
# Operators whose output size (and so an output's dim 0) can depend on input values.
DATA_DEPENDENT = frozenset({
    "NonZero", "Compress", "Unique", "NonMaxSuppression", "StringSplit", "SplitToSequence",
    "Loop", "Scan", "If",
})
SEED = 20261201
Dim = int | str | None  # as ONNX Runtime reports a dimension: fixed, symbolic or unknown
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Decision:
    batched: bool
    reason: str

    def to_json(self) -> dict:
        return {"enabled": self.batched, "reason": self.reason}


def decide(mode: str, inputs: list[TensorSpec], input_dims: list[Sequence[Dim]],
           outputs: list[TensorSpec], output_dims: list[Sequence[Dim] | None],
           operators: set[str], run: Runner, json_outputs: frozenset[str] = frozenset(),
           fill: int = 1) -> Decision:
    """Decide for one version; ``run(feeds)`` runs it once and returns every output in the
    order of ``outputs``. ``*_dims`` are ONNX Runtime's shapes (names kept); ``fill`` is the
    size sample inputs give dynamic dims other than dim 0 (one the warm-up ran with)."""
    if mode == "off":
        return Decision(False, "batching is off (--batching off)")
    if problem := _inputs_problem(inputs, input_dims):
        return Decision(False, problem)
    if mode == "on":
        return Decision(True, "batching forced on (--batching on)")
    batch = _batch_name(input_dims)
    if problem := _outputs_problem(outputs, output_dims, batch, operators):
        return Decision(False, problem)
    if problem := _joined_problem(inputs, outputs, run, json_outputs, fill):
        return Decision(False, problem)
    return Decision(True, "dim 0 is the batch, and a joined run equals separate runs")


def _inputs_problem(inputs: list[TensorSpec], dims: list[Sequence[Dim]]) -> str | None:
    if not inputs:
        return "the model has no inputs"
    for spec, shape in zip(inputs, dims):
        if not shape:
            return f"input '{spec.name}' has no dim 0 (a scalar)"
        if isinstance(shape[0], int):
            return f"input '{spec.name}' has a fixed dim 0 ({shape[0]})"
    names = {shape[0] for shape in dims if isinstance(shape[0], str)}
    if len(names) > 1:
        return f"the inputs' dim 0 differ ({', '.join(sorted(map(repr, names)))})"
    return None


def _batch_name(dims: list[Sequence[Dim]]) -> str | None:
    return next((shape[0] for shape in dims if isinstance(shape[0], str)), None)


def _outputs_problem(outputs: list[TensorSpec], dims: list[Sequence[Dim] | None],
                     batch: str | None, operators: set[str]) -> str | None:
    dependent = sorted(operators & DATA_DEPENDENT)
    for spec, shape in zip(outputs, dims):
        first = shape[0] if shape else None
        if shape is not None and len(shape) == 0:
            return f"output '{spec.name}' is a scalar, not one row per request row"
        if isinstance(first, int):
            return f"output '{spec.name}' dim 0 is fixed ({first}), not the batch"
        if isinstance(first, str) and batch is not None and first != batch:
            return f"output '{spec.name}' dim 0 ('{first}') is not the inputs' dim 0 ('{batch}')"
        if (first is None or batch is None) and dependent:
            return (f"output '{spec.name}' dim 0 is not known to be the batch and the graph has "
                    f"{', '.join(dependent[:3])}, whose output size can depend on the data")
    return None


def _joined_problem(inputs: list[TensorSpec], outputs: list[TensorSpec], run: Runner,
                    json_outputs: frozenset[str], fill: int) -> str | None:
    """Run a 1-row and a 2-row request separately and joined; what differs, or None. Sample
    values are random; a model that refuses them (a string category it does not know, an
    index past its table) is checked again with random floats and the warm-up's zeros and
    empty strings elsewhere."""
    for only_floats in (False, True):
        rng = np.random.default_rng(SEED)
        first = {s.name: _sample(s, 1, fill, rng, 1.0, only_floats) for s in inputs}
        second = {s.name: _sample(s, 2, fill, rng, 3.0, only_floats) for s in inputs}
        joined = {name: np.concatenate([first[name], second[name]]) for name in first}
        try:
            alone = [run(first), run(second)]
            together = run(joined)
            break
        except Exception as exc:  # the check itself cannot tell: do not batch
            failure = f"the batching check could not run the model on sample rows ({exc})"
    else:
        return failure
    for index, spec in enumerate(outputs):
        parts = [alone[0][index], alone[1][index]]
        whole = together[index]
        if any(np.ndim(p) == 0 for p in parts + [whole]) \
                or [len(parts[0]), len(parts[1]), len(whole)] != [1, 2, 3]:
            return f"output '{spec.name}' dim 0 does not follow the rows of the request"
        expected = np.concatenate(parts)
        if not _same(expected, whole, spec.name in json_outputs):
            return (f"output '{spec.name}' differed when requests shared a run (a joined run "
                    "is not the same as separate runs)")
    return None


def _sample(spec: TensorSpec, rows: int, fill: int, rng: np.random.Generator,
            scale: float, only_floats: bool = False) -> np.ndarray:
    """Sample values for one input: dim 0 = rows, other unknown dims ``fill``; rows differ
    (with ``only_floats``, non-float inputs are zeros or empty strings, as in warm-up)."""
    shape = (rows,) + tuple(fill if d < 0 else d for d in spec.shape[1:])
    kind = spec.datatype
    if kind == "BYTES":
        if only_floats:
            return np.full(shape, "", dtype=object)
        words = np.array(["alpha", "beta", "gamma delta", "epsilon", "zeta eta"], dtype=object)
        return rng.choice(words, size=shape)
    dtype = DTYPES[kind]
    if dtype.kind in "biu":
        if only_floats:
            return np.zeros(shape, dtype=dtype)
        return rng.random(shape) < 0.5 if kind == "BOOL" else \
            rng.integers(0, 2, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _same(expected: np.ndarray, got: np.ndarray, json_text: bool) -> bool:
    if expected.shape != got.shape:
        return False
    if json_text:
        return _same_maps(expected, got)
    if expected.dtype.kind == "f" or got.dtype.kind == "f":
        a, b = expected.astype(np.float64), got.astype(np.float64)
        tolerance = 2e-3 if np.float16 in (expected.dtype, got.dtype) else 1e-4
        scale = max(1.0, float(np.nanmax(np.abs(a), initial=0.0)))
        return bool(np.allclose(a, b, rtol=tolerance, atol=tolerance * 0.1 * scale,
                                equal_nan=True))
    return bool(np.array_equal(expected, got))


def _same_maps(expected: np.ndarray, got: np.ndarray) -> bool:
    """Outputs served as JSON text (ZipMap rows): equal keys, close values."""
    for a, b in zip(expected.flat, got.flat):
        left, right = orjson.loads(a), orjson.loads(b)
        if left.keys() != right.keys():
            return False
        if not np.allclose([left[k] for k in left], [right[k] for k in left], rtol=1e-4,
                           atol=1e-6):
            return False
    return True
