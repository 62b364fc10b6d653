"""Transformers: a version's trusted Python pre- and post-processing around its model.

A script (``--transformer recs.py``) defines a ``Transformer`` class: ``__init__(self,
context)`` runs once per loaded version; ``preprocess(self, inputs, headers) -> feeds`` and
``postprocess(self, outputs, inputs) -> outputs`` are optional, sync or ``async``. Inputs,
feeds and outputs are dicts of numpy arrays by name (BYTES elements as ``bytes``). Class
attributes ``inputs``/``outputs`` (lists of ``{"name", "datatype", "shape"}``) declare the
pipeline's own request/response signature; ``sample()`` (or an ``example`` attribute)
gives the request inputs of the warm-up run. docs/pipelines.md is the user's guide.

Sync user code runs in a bounded thread pool (MSERVE_TRANSFORMER_THREADS, 4), never on the
event loop; async code runs on the worker's loop and must not block it. The script is
imported from the store under a module name of its own per version, so two versions of one
script never share state.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mserve.daemon.errors import BadRequest, DeployFailed, MserveError
from mserve.daemon.protocol.tensors import DTYPES, TensorSpec

DEFAULT_THREADS = 4
log = logging.getLogger("mserve.transformer")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class TransformerFailed(MserveError):
    """User code failed after the request was checked (postprocess, or a preprocess that
    returned no feeds the model can take): a 500 with a short message."""

    status = 500


@dataclass
class Context:
    """What ``Transformer.__init__`` receives."""

    folder: str  # the script's folder in the store: its data files are here
    version: int
    inputs: list[dict]  # the model's signature: [{"name", "datatype", "shape"}]
    outputs: list[dict]
    logger: logging.Logger  # writes to the deployment's log


def pool() -> ThreadPoolExecutor:
    """The worker's pool for sync user code (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            threads = int(os.environ.get("MSERVE_TRANSFORMER_THREADS") or DEFAULT_THREADS)
            _pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                       thread_name_prefix="transformer")
        return _pool


class Pipeline:
    """One loaded transformer: the script's object and what it declares."""

    def __init__(self, script: str, number: int, instance, inputs, outputs):
        self.script, self.number, self.instance = script, number, instance
        self.name = os.path.basename(script)
        self.inputs: list[TensorSpec] | None = inputs  # its own request signature, if any
        self.outputs: list[TensorSpec] | None = outputs
        self.pre = getattr(instance, "preprocess", None)
        self.post = getattr(instance, "postprocess", None)

    def meta(self) -> dict:
        return {"script": self.name, "preprocess": self.pre is not None,
                "postprocess": self.post is not None,
                "own_signature": self.inputs is not None or self.outputs is not None}

    async def preprocess(self, inputs: dict, headers: dict, graph: list[TensorSpec]) -> dict:
        """The model's feeds for one request; a script error is that request's 400."""
        if self.pre is None:
            return check_feeds(self.name, inputs, graph)
        try:
            feeds = await _call(self.pre, inputs, headers)
        except Exception as exc:
            log_failure(self.name, "preprocess", exc)
            raise BadRequest(message(exc)) from None
        return check_feeds(self.name, feeds, graph)

    async def postprocess(self, outputs: dict, inputs: dict) -> dict:
        """The answer's outputs for one request; a script error is a 500."""
        if self.post is None:
            return outputs
        try:
            result = await _call(self.post, outputs, inputs)
        except Exception as exc:
            log_failure(self.name, "postprocess", exc)
            raise TransformerFailed(f"postprocess of transformer '{self.name}' failed: "
                                    f"{message(exc)}") from None
        return check_outputs(self.name, result)

    def ordered(self, outputs: dict) -> dict:
        """Postprocess's outputs in the order declared (the declared ones only), else as
        returned."""
        if self.outputs is None:
            return outputs
        return {s.name: self.pick(outputs, s.name) for s in self.outputs}

    def pick(self, outputs: dict, name: str):
        """Output ``name`` (checked against the signature) of postprocess's answer."""
        if name not in outputs:
            returned = ", ".join(outputs) or "none"
            raise TransformerFailed(f"output '{name}' is not among those transformer "
                                    f"'{self.name}' returned ({returned})")
        return outputs[name]

    def sample(self, model_inputs: list[TensorSpec], fill: int = 1) -> dict:
        """The request inputs of the warm-up run: the script's, else zeros of the signature."""
        if (make := getattr(self.instance, "sample", None)) is not None:
            given = make()
        elif (given := getattr(self.instance, "example", None)) is None:
            return {s.name: _zeros(s, fill) for s in self.inputs or model_inputs}
        if not isinstance(given, dict):
            raise DeployFailed(f"transformer '{self.name}': sample() must return a dict of "
                               f"input name to array, not {type(given).__name__}")
        return {k: _array(v) for k, v in given.items()}


def load(script: str, number: int, inputs: list[TensorSpec], outputs: list[TensorSpec]
         ) -> Pipeline:
    """Import ``script`` (from the store), make its Transformer; DeployFailed with the
    script's own error otherwise."""
    name = os.path.basename(script)
    module = _import(script, number)
    cls = getattr(module, "Transformer", None)
    if not inspect.isclass(cls):
        raise DeployFailed(f"transformer '{name}' defines no class Transformer")
    context = Context(str(Path(script).parent), number, [s.to_json() for s in inputs],
                      [s.to_json() for s in outputs],
                      logging.getLogger(f"mserve.transformer.{name}"))
    try:
        instance = cls(context) if _takes_argument(cls) else cls()
    except Exception as exc:
        log_failure(name, "__init__", exc)
        raise DeployFailed(f"transformer '{name}': __init__ failed: {message(exc)}") from None
    return Pipeline(script, number, instance, _declared(name, cls, "inputs"),
                    _declared(name, cls, "outputs"))


def run_sync(function, *args):
    """Call a user function from a thread that has no event loop (warm-up at load)."""
    result = function(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def _import(script: str, number: int):
    name = os.path.basename(script)
    digest = abs(hash((script, number))) % 16**8
    module_name = f"mserve_transformer_{Path(script).stem}_v{number}_{digest:08x}"
    spec = importlib.util.spec_from_file_location(module_name, script)
    if spec is None or spec.loader is None:
        raise DeployFailed(f"transformer '{name}' cannot be imported (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a SystemExit in a script must not end the worker
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        log_failure(name, "import", exc)
        raise DeployFailed(f"transformer '{name}' failed to import: {message(exc)}") from None
    return module


def _takes_argument(cls) -> bool:
    try:
        return len(inspect.signature(cls).parameters) > 0
    except (TypeError, ValueError):
        return True


def _declared(name: str, cls, attribute: str) -> list[TensorSpec] | None:
    specs = getattr(cls, attribute, None)
    if specs is None:
        return None
    try:
        out = [TensorSpec(s["name"], s["datatype"], tuple(int(d) for d in s["shape"]))
               for s in specs]
    except (TypeError, KeyError, ValueError) as exc:
        raise DeployFailed(f"transformer '{name}': '{attribute}' must be a list of "
                           f"{{'name', 'datatype', 'shape'}} dicts ({message(exc)})") from None
    for spec in out:
        if spec.datatype not in DTYPES and spec.datatype != "BYTES":
            raise DeployFailed(f"transformer '{name}': {attribute[:-1]} '{spec.name}' has "
                               f"unknown datatype {spec.datatype!r}")
    return out


async def _call(function, *args):
    if inspect.iscoroutinefunction(function):
        return await function(*args)
    result = await asyncio.get_running_loop().run_in_executor(pool(), function, *args)
    if inspect.isawaitable(result):
        return await result
    return result


def check_feeds(name: str, feeds, graph: list[TensorSpec]) -> dict:
    """What preprocess returned, as the model's feeds: every input it needs, its dtype."""
    if not isinstance(feeds, dict):
        raise TransformerFailed(f"preprocess of transformer '{name}' must return a dict of "
                                f"the model's inputs, not {type(feeds).__name__}")
    out = {}
    for spec in graph:
        if spec.name not in feeds:
            raise TransformerFailed(
                f"preprocess of transformer '{name}' returned no '{spec.name}' (the model's "
                f"inputs: {', '.join(s.name for s in graph)})")
        dtype = object if spec.datatype == "BYTES" else DTYPES[spec.datatype]
        try:
            out[spec.name] = np.ascontiguousarray(np.asarray(feeds[spec.name], dtype=dtype))
        except (TypeError, ValueError) as exc:
            raise TransformerFailed(f"preprocess of transformer '{name}': '{spec.name}' is "
                                    f"not {spec.datatype} ({message(exc)})") from None
    return out


def check_outputs(name: str, result) -> dict:
    if not isinstance(result, dict):
        raise TransformerFailed(f"postprocess of transformer '{name}' must return a dict of "
                                f"outputs, not {type(result).__name__}")
    return {k: _array(v) for k, v in result.items()}


def _array(value) -> np.ndarray:
    """A user value as an array the codecs can send: text as object arrays of str."""
    array = np.asarray(value)
    if array.dtype.kind in "US":
        return array.astype(object)
    return array


def _zeros(spec: TensorSpec, fill: int) -> np.ndarray:
    shape = tuple(d if d >= 0 else 1 if i == 0 else fill for i, d in enumerate(spec.shape))
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=DTYPES[spec.datatype])


def message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:500]
    return text or type(exc).__name__


def log_failure(name: str, where: str, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.error("transformer %s: %s raised\n%s", name, where, text.rstrip())
