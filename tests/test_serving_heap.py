"""The worker's heap after a version loads: frozen, so the cycle collector's passes under
load walk only what requests made (a full pass over a loaded worker stalled its loop ~30 ms)."""

from __future__ import annotations

import asyncio
import gc
import time

from mserve.daemon.worker import runtime
from mserve.daemon.worker.serving import Serving
from tests.models import affine


def test_loading_a_version_freezes_the_heap(tmp_path):
    async def main():
        serving = Serving("heap")
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        serving.add(runtime.load(1, str(affine(tmp_path / "a.onnx"))))
        assert gc.get_freeze_count() > 10_000  # the modules, the session, the version
        started = time.perf_counter()
        gc.collect()
        return time.perf_counter() - started

    try:
        full_pass = asyncio.run(main())
    finally:
        gc.unfreeze()
    assert full_pass < 0.01, f"a full collection took {full_pass * 1000:.1f} ms"
