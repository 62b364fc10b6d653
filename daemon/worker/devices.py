"""Where a version runs: ``--device auto|cpu|cuda|cuda:N``, the CUDA execution provider's
options for serving, and, when CUDA cannot be used, the plain reason why.

``cuda:N`` picks card N (``cuda`` is card 0). The provider is configured for a server that
keeps sessions for a long time and runs many batch sizes: memory arenas grow by what a run
asks (``kSameAsRequested``, not doubling), convolution algorithms are chosen by heuristic
rather than by timing every algorithm for every new shape (``EXHAUSTIVE``, ONNX Runtime's
default, makes the first request of each batch size slow), and copies use the default stream.
CUDA libraries installed as wheels (``pip install 'onnxruntime-gpu[cuda,cudnn]'``) are loaded
first, so no ``LD_LIBRARY_PATH`` is needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from mserve.daemon.errors import DeployFailed

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DEVICE = re.compile(r"auto|cpu|cuda(?::(?P<index>\d{1,2}))?")
CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
HELP = "auto (CUDA if usable, else the CPU), cpu, cuda or cuda:N (card N)"


def parse(device: str) -> tuple[str, int]:
    """``device`` as (kind, card): ("auto", 0), ("cpu", 0) or ("cuda", N); DeployFailed
    for anything else."""
    match = DEVICE.fullmatch(device or "")
    if match is None:
        raise DeployFailed(f"unknown device {device!r}: use {HELP}")
    if device.startswith("cuda"):
        return "cuda", int(match["index"] or 0)
    return device, 0


def providers(kind: str, card: int) -> list:
    """The execution providers to ask ONNX Runtime for."""
    if kind == "cpu":
        return [CPU]
    return [(CUDA, {"device_id": str(card), **CUDA_OPTIONS}), CPU]


def preload(ort) -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels when they are installed (ONNX Runtime
    1.21+, which prints what it could not find: to stderr, the worker's log)."""
    if hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
        with contextlib.suppress(Exception), contextlib.redirect_stdout(sys.stderr):
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False)


def why_not_cuda(ort) -> str:
    """Why ONNX Runtime's CUDA provider did not load: the libraries it could not find (from
    the dynamic loader), or a missing driver or card."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    library = os.path.join(os.path.dirname(ort.__file__), "capi",
                           "libonnxruntime_providers_cuda.so")
    missing = _missing_libraries(library)
    built_for = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", None)
    cuda = f"CUDA {built_for}" if built_for else "CUDA"
    driver = [name for name in missing if name.startswith("libcuda.so")]
    others = [name for name in missing if name not in driver]
    if others:
        return (f"the {cuda} libraries onnxruntime-gpu {ort.__version__} was built for are "
                f"missing ({', '.join(others)}); pip install 'onnxruntime-gpu[cuda,cudnn]'")
    if driver:
        return "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    return "no usable NVIDIA GPU (the CUDA provider loaded, but no session could use it)"


def _missing_libraries(library: str) -> list[str]:
    """The shared libraries ``library`` needs that the dynamic loader cannot find (ldd)."""
    ldd = shutil.which("ldd")
    if ldd is None or not os.path.exists(library):
        return []
    try:
        out = subprocess.run([ldd, library], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]
