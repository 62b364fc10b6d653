"""TF Serving / KServe V1 ``:predict`` codec: the row ("instances") and columnar ("inputs") forms.

Values are cast to each input's declared datatype and checked with the v2 codec's rules; BYTES
inputs also take ``{"b64": "..."}``. JSON has no NaN or Infinity here (orjson is strict);
outputs write them as null, as v2 does. A large value's element count and shape (read along
its first elements) are checked before it is converted, and it is converted and written a
slice at a time (see ``tensors`` and ``bigjson``).
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from mserve.daemon.errors import BadRequest
from mserve.daemon.protocol import bigjson
from mserve.daemon.protocol.codecs import json_ready, load_json_object
from mserve.daemon.protocol.tensors import (DEFAULT_MAX_ELEMENTS, SLICE_ELEMENTS, TensorSpec,
                                          array_from_json, check_input_names, check_shape,
                                          data_shape, pause, shape_text)

FORMS = ("instances", "inputs")


def parse_predict(body: bytes, specs: list[TensorSpec], *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[dict[str, np.ndarray], str]:
    """Decode a predict request into (input name -> array, "instances" or "inputs")."""
    doc = load_json_object(body)
    if len(body) <= bigjson.SMALL:
        return _predict(doc, specs, max_elements)
    values: dict = {}
    try:
        return _predict(doc, specs, max_elements, values)
    finally:  # the rows of a large body: freed a slice at a time
        bigjson.release(values)
        bigjson.release(doc)


def _predict(doc: dict, specs: list[TensorSpec], max_elements: int,
             values: dict | None = None) -> tuple[dict[str, np.ndarray], str]:
    """``values`` (when given) receives the columns read, for the caller to release."""
    if ("instances" in doc) == ("inputs" in doc):
        raise BadRequest("request must have exactly one of 'instances' (row form) "
                         "or 'inputs' (columnar form)")
    by_name = {spec.name: spec for spec in specs}
    if "instances" in doc:
        form, columns = "instances", _from_instances(doc["instances"], by_name)
    else:
        form, columns = "inputs", _from_columns(doc["inputs"], by_name)
    if values is not None:
        values.update(columns)
    check_input_names(columns, specs)
    arrays = {name: _to_array(name, value, by_name[name], max_elements)
              for name, value in columns.items()}
    return arrays, form


def _is_b64(value) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _only_input(by_name: dict[str, TensorSpec], form: str) -> str:
    if len(by_name) != 1:
        raise BadRequest(f"{form}: the model has inputs {', '.join(by_name) or '(none)'}, so each "
                         "value must be an object keyed by input name")
    return next(iter(by_name))


def _from_instances(instances, by_name: dict[str, TensorSpec]) -> dict[str, list]:
    """Row form: a list over the batch of tensors (one input) or of {input name: value} objects."""
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list")
    if not any(_named_rows(instances)):
        return {_only_input(by_name, "instances"): instances}
    if not all(_named_rows(instances)):
        raise BadRequest("'instances' must be all objects keyed by input name or all tensors, "
                         "not a mix")
    columns: dict[str, list] = {name: [] for name in instances[0]}
    for index, row in enumerate(instances):
        if row.keys() != columns.keys():
            raise BadRequest(f"instances[{index}] has inputs {', '.join(row) or '(none)'} but "
                             f"instances[0] has {', '.join(columns) or '(none)'}")
        for name, value in row.items():
            columns[name].append(value)
        if not index & 4095:
            pause()
    return columns


def _named_rows(instances: list):
    """Per slice of rows, whether they are all objects keyed by input name (True), all
    tensors (False) or a mix (both); slices that hold no object at all are skipped in C."""
    for start in range(0, len(instances), SLICE_ELEMENTS):
        part = instances[start:start + SLICE_ELEMENTS]
        if dict not in map(type, part):
            yield False
            continue
        named = [isinstance(row, dict) and not _is_b64(row) for row in part]
        yield from (any(named), all(named))
        pause()


def _from_columns(inputs, by_name: dict[str, TensorSpec]) -> dict:
    """Columnar form: one tensor (one input) or an object {input name: tensor}."""
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return inputs
    return {_only_input(by_name, "inputs"): inputs}


def _to_array(name: str, value, spec: TensorSpec, max_elements: int) -> np.ndarray:
    label = f"input '{name}'"
    shape = data_shape(value)
    if math.prod(shape) > SLICE_ELEMENTS:  # large: refuse what is wrong before converting
        if math.prod(shape) > max_elements:
            raise BadRequest(f"{label}: {math.prod(shape)} elements is more than the limit of "
                             f"{max_elements}")
        check_shape(label, shape, spec)
    array = array_from_json(label, spec.datatype, value, allow_b64=True)
    if array.size > max_elements:
        raise BadRequest(f"{label}: {array.size} elements is more than the limit of {max_elements}")
    check_shape(label, array.shape, spec)
    return array


def encode_predict(outputs: dict[str, np.ndarray], form: str) -> bytes:
    """Encode a predict response: {"predictions": rows} or {"outputs": value or {name: value}}.

    Numbers as numbers (FP16 widened, NaN and infinities as null), BOOL as true/false, BYTES
    as str (UTF-8, undecodable bytes replaced), as in v2.
    """
    if form == "instances":
        doc = {"predictions": _predictions(outputs)}
    elif form == "inputs":
        values = {name: json_ready(array) for name, array in outputs.items()}
        doc = {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    else:
        raise ValueError(f"unknown predict form {form!r}; expected one of {FORMS}")
    if sum(array.size for array in outputs.values()) > bigjson.PIECE_ELEMENTS:
        return bigjson.dumps(doc)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _predictions(outputs: dict[str, np.ndarray]):
    """Rows over the batch: one output's rows, or per row an object {output name: row}.

    A lone 0-d output is one row. Several outputs must share dim 0 (see ``_batch_size``).
    """
    if not outputs:
        return []
    if len(outputs) == 1:
        (array,) = outputs.values()
        return json_ready(array.reshape(1) if array.ndim == 0 else array)
    size = _batch_size(outputs)
    columns = [(name, json_ready(array)) for name, array in outputs.items()]

    def rows(start: int, stop: int) -> list[dict]:
        return [{name: values[index] for name, values in columns} for index in range(start, stop)]

    if sum(array.size for array in outputs.values()) > bigjson.PIECE_ELEMENTS:
        per_row = sum(array.size for array in outputs.values()) // max(size, 1)
        return bigjson.Rows(size, rows, per_row)
    return rows(0, size)


def _batch_size(outputs: dict[str, np.ndarray]) -> int:
    """The dim 0 that several outputs share, else BadRequest (400) naming the first output
    that differs: TF Serving answers INVALID_ARGUMENT "Tensor name: X has inconsistent batch
    size: 3 expecting: 2" (or "has no shape information" for a 0-d one) in this case."""
    first, array = next(iter(outputs.items()))
    size = array.shape[0] if array.ndim else None
    for name, other in outputs.items():
        if other.ndim == 0:
            problem = f"output '{name}' is a scalar (shape [])"
        elif other.shape[0] != size:
            problem = (f"output '{name}' has {other.shape[0]} rows (shape "
                       f"{shape_text(other.shape)}) but '{first}' has {size} "
                       f"(shape {shape_text(array.shape)})")
        else:
            continue
        raise BadRequest(f"the outputs do not share a batch dimension, so they cannot be rows "
                         f"of 'predictions': {problem}; send the columnar form "
                         "{\"inputs\": ...} to get each output whole")
    return size
