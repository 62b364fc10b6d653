"""Small PyTorch models exported by the real ``torch.onnx.export`` (tests/zoo.py builds only
torch-*shaped* graphs, since torch is too heavy for the test extras; ``make zoo`` installs
the CPU wheel and runs tests/test_e2e_torch_zoo.py on these).

Every module is made with a fixed seed and exported twice: with the dynamo exporter (the
default since torch 2.9; it writes ``model.onnx`` plus ``model.onnx.data`` beside it) and
with the TorchScript one (``dynamo=False``, one file). Each export is then probed in
process: ONNX Runtime on the file must give torch's own answer at every request size; the
sizes where it does not are dropped and said in ``note`` (torch's dynamo exporter bakes the
traced sequence length of nn.GRU/nn.LSTM into the graph while declaring the axis dynamic).
An export torch refuses is kept with its ``error``, to be skipped with that reason.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tests import zoo
from tests.zoo import Request

EXPORTERS = ("dynamo", "torchscript")
MUST, NEVER, EITHER = "must", "never", "either"  # Spec.batching: what the server should decide
FEATURES, HIDDEN, SEQ_LENGTHS = 4, 8, (3, 5, 7)
RTOL, ATOL = 1e-4, 1e-5  # served float32 answers against torch's own


class MLP(nn.Module):
    def __init__(self, a: int = 8, b: int = 16, c: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Conv2d + ReLU + AdaptiveAvgPool2d + Linear on [batch, 3, 8, 8] images."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class Positive(nn.Module):
    """``torch.nonzero(x > 0)``: [K, 2] indices, K follows the data."""

    def forward(self, x):
        return torch.nonzero(x > 0)


class BatchFirstGRU(nn.Module):
    """``out, _ = gru(x)`` with ``batch_first=True``: [batch, seq, 8] alone (h_n is
    [layers, batch, 8] even then, which would make dim 0 not the batch)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0]


def quantized_mlp() -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(MLP().eval(), {nn.Linear}, dtype=torch.qint8)


def _floats(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def rows(width: tuple[int, ...]):
    """Requests of ``size`` rows of shape ``width`` (input 'x')."""
    return lambda rng, size: Request({"x": _floats(rng, size, *width)})


def time_major(outputs: tuple[str, ...]):
    """``size`` time steps of 1 or 2 sequences; every other request asks for 'output' alone
    (as ``output, _ = rnn(x)`` would)."""
    def request(rng: np.random.Generator, size: int) -> Request:
        batch = int(rng.integers(1, 3))
        subset = ("output",) if rng.integers(2) else None
        return Request({"input": _floats(rng, size, batch, FEATURES)}, subset)
    return request


def batch_first(rng: np.random.Generator, size: int) -> Request:
    """``size`` sequences of 3 or 6 steps (requests join only when their lengths match)."""
    return Request({"input": _floats(rng, size, int(rng.choice([3, 6])), FEATURES)})


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], nn.Module]
    example: tuple[tuple[int, ...], ...]  # shapes of the traced inputs
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]  # dynamic axes as a user names them (inputs and outputs)
    request: Callable[[np.random.Generator, int], Request]
    sizes: tuple[int, ...] = (1, 2, 3, 4)
    batching: str = EITHER
    optional: bool = False  # torch may refuse to export it (then the test skips, saying why)


def _rnn(name: str, cls, outputs: tuple[str, ...]) -> Spec:
    state = {o: {1: "batch"} for o in outputs[1:]}
    return Spec(name, lambda: cls(FEATURES, HIDDEN), ((5, 2, FEATURES),), ("input",), outputs,
                {"input": {0: "seq", 1: "batch"}, "output": {0: "seq", 1: "batch"}, **state},
                time_major(outputs), SEQ_LENGTHS, NEVER)


BATCH = {"x": {0: "batch"}, "y": {0: "batch"}}
SPECS = [
    _rnn("gru", nn.GRU, ("output", "h_n")),
    _rnn("lstm", nn.LSTM, ("output", "h_n", "c_n")),
    Spec("gru-bf", BatchFirstGRU, ((2, 5, FEATURES),), ("input",), ("output",),
         {"input": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}, batch_first),
    Spec("cnn", CNN, ((2, 3, 8, 8),), ("x",), ("y",), BATCH, rows((3, 8, 8)), batching=MUST),
    Spec("mlp", MLP, ((2, 8),), ("x",), ("y",), BATCH, rows((8,)), batching=MUST),
    Spec("nonzero", Positive, ((2, 5),), ("x",), ("y",), {"x": {0: "batch"}}, rows((5,)),
         batching=NEVER),
    Spec("quantized", quantized_mlp, ((2, 8),), ("x",), ("y",), BATCH, rows((8,)),
         optional=True),
]
NAMES = [f"{s.name}-{e}" for s in SPECS for e in EXPORTERS]


@dataclass
class Export:
    spec: Spec
    exporter: str
    module: nn.Module | None = None  # the torch reference, in eval mode
    path: Path | None = None  # the .onnx file to deploy
    error: str = ""  # why there is no usable export
    sizes: tuple[int, ...] = ()  # the request sizes where ONNX Runtime agrees with torch
    note: str = ""  # what the probe found
    files: list[str] = field(default_factory=list)  # what the export wrote

    @property
    def name(self) -> str:
        return f"{self.spec.name}-{self.exporter}"

    def as_zoo_model(self, name: str) -> zoo.Model:
        """The test_e2e_zoo helpers' view of this export, deployed as ``name``."""
        must = zoo.MUST if self.spec.batching == MUST else ""
        return zoo.Model(name, lambda folder: self.path, self.spec.request, self.sizes, must)

    def reference(self, req: Request) -> dict[str, np.ndarray]:
        """torch's own outputs for ``req`` (all of them, or those it asks for)."""
        with torch.no_grad():
            got = self.module(*(torch.from_numpy(req.inputs[n]) for n in self.spec.inputs))
        values = dict(zip(self.spec.outputs, _flat(got)))
        return {n: values[n] for n in (req.outputs or self.spec.outputs)}


def _flat(value) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.numpy()]
    return [a for v in value for a in _flat(v)]


@contextlib.contextmanager
def _quiet():
    """torch's exporters warn (deprecations, RNN notes) and print progress; the suite makes
    warnings errors, and none of these is about mserve."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export(spec: Spec, exporter: str, folder: Path, seed: int = 0) -> Export:
    """Make ``spec``'s module with a fixed seed, export it to ``folder/model.onnx`` and probe
    the file; any failure is the Export's ``error``."""
    result = Export(spec, exporter)
    target = folder / f"{spec.name}-{exporter}"
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    try:
        with _quiet():
            result.module = spec.make().eval()
            example = tuple(torch.randn(*shape) for shape in spec.example)
            _export(result.module, example, spec, exporter, target / "model.onnx")
    except Exception as exc:  # an export torch refuses is skipped with its reason
        result.error = f"torch.onnx.export ({exporter}) failed: {_summary(exc)}"
        return result
    result.path = target / "model.onnx"
    result.files = sorted(p.name for p in target.iterdir())
    _probe(result)
    return result


def _export(module: nn.Module, example: tuple, spec: Spec, exporter: str, path: Path) -> None:
    names = dict(input_names=list(spec.inputs), output_names=list(spec.outputs))
    if exporter == "dynamo":
        shapes = tuple({axis: torch.export.Dim(n) for axis, n in spec.axes.get(i, {}).items()}
                       for i in spec.inputs)
        torch.onnx.export(module, example, str(path), dynamic_shapes=shapes, verbose=False,
                          **names)
    else:
        axes = {k: v for k, v in spec.axes.items() if k in spec.inputs + spec.outputs}
        torch.onnx.export(module, example, str(path), dynamic_axes=axes, dynamo=False,
                          **names)


def _summary(exc: Exception) -> str:
    """The exception's own line: torch's wrapper messages bury it under advice."""
    text = " ".join(str(exc).split())
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    return f"{type(exc).__name__}: {text.strip()[:300]}"


def _probe(result: Export, tries: int = 4) -> None:
    """Keep the sizes at which ONNX Runtime on the file agrees with torch."""
    session = zoo.reference_session(result.path)
    rng = np.random.default_rng(1234)
    good, bad = [], []
    for size in result.spec.sizes:
        reqs = [result.spec.request(rng, size) for _ in range(tries)]
        (good if all(_agrees(session, result, r) for r in reqs) else bad).append(size)
    result.sizes = tuple(good)
    if bad:
        result.note = (f"ONNX Runtime on the export disagrees with torch (or fails) at size "
                       f"{', '.join(map(str, bad))}; requests use {result.sizes or 'none'}")
    if not good:
        result.error = f"the export never answers like torch: {result.note}"


def _agrees(session, result: Export, req: Request) -> bool:
    names = list(req.outputs or result.spec.outputs)
    try:
        with _quiet():
            got = dict(zip(names, session.run(names, req.inputs)))
    except Exception:
        return False
    return not torch_differences(result.reference(req), got)


def torch_differences(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """What differs between torch's outputs and ``got`` (empty: the same)."""
    found = []
    for name, value in want.items():
        other = got.get(name)
        if other is None or other.shape != value.shape:
            found.append(f"{name}: shape {None if other is None else other.shape}, torch "
                         f"{value.shape}")
        elif value.dtype.kind == "f":
            if not np.allclose(other, value, rtol=RTOL, atol=ATOL):
                found.append(f"{name}: max |diff| {np.abs(other - value).max():.3g} vs torch")
        elif not np.array_equal(other, value):
            found.append(f"{name}: differs from torch")
    return found


def export_all(folder: Path) -> dict[str, Export]:
    return {e.name: e for e in (export(s, x, folder) for s in SPECS for x in EXPORTERS)}
