"""The validation child: a new version is loaded, warmed up and checked (its batching
decision included) in a short-lived process before the serving worker loads it, so a model
that crashes or hangs ONNX Runtime cannot take down what serves the current version.

The child is ``python -m mserve.daemon.worker.probe``; this module starts it, bounds it in
time and turns what it printed (or how it died) into metadata or a DeployFailed.
"""

from __future__ import annotations

import asyncio
import json
import os

from mserve.daemon.errors import DeployFailed


async def probe(python: str, path: str, device: str, batching: str | None,
                timeout: float, transformer: str | None = None) -> dict:
    """The version's metadata as the child reports it; DeployFailed with a plain reason.
    With ``transformer`` the child also imports that script, makes its Transformer and runs
    preprocess, the model and postprocess once on the warm-up sample."""
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "mserve.daemon.worker.probe", path, device, batching or "auto",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MSERVE_PROBE_PARENT": str(os.getpid()),
             "MSERVE_PROBE_TIMEOUT": str(timeout),
             "MSERVE_PROBE_TRANSFORMER": transformer or ""})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeployFailed(f"loading the model took longer than {timeout:.0f} s "
                           "(MSERVE_LOAD_TIMEOUT); it was stopped") from None
    lines = out.decode(errors="replace").strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {}
    if proc.returncode == 0 and "error" not in answer:
        return answer
    if "error" in answer:
        raise DeployFailed(answer["error"])
    raise DeployFailed(f"loading the model crashed ONNX Runtime (exit {proc.returncode})"
                       f"{_last_line(err)}")


def _last_line(err: bytes) -> str:
    lines = [l for l in err.decode(errors="replace").splitlines() if l.strip()]
    return f": {lines[-1].strip()[:300]}" if lines else ""
