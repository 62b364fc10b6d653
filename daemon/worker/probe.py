"""Load and warm up a model in a short-lived process, so a model that crashes or hangs
ONNX Runtime cannot take down the worker that serves the current version.

``python -m mserve.daemon.worker.probe PATH DEVICE [BATCHING]`` prints one JSON line: the
model's metadata (its batching decision included), or ``{"error": ...}`` (exit 1). With
``MSERVE_PROBE_TRANSFORMER=SCRIPT`` it also imports that transformer, makes it and runs it
with the model once on the warm-up sample. It ends itself when the daemon that asked dies,
or past the load timeout: nobody else would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

EXIT_ORPHANED, EXIT_TIMEOUT = 3, 4


def _watch(parent: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(0.25)
        if os.getppid() != parent:
            os._exit(EXIT_ORPHANED)
        if time.monotonic() > deadline:
            os._exit(EXIT_TIMEOUT)


def main(argv: list[str]) -> int:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything ONNX Runtime prints goes to stderr, not into our answer
    limit = float(os.environ.get("MSERVE_PROBE_TIMEOUT") or 120) + 5  # the daemon's bound
    # The daemon names itself: it may have died before this line (getppid() is then init's).
    parent = int(os.environ.get("MSERVE_PROBE_PARENT") or os.getppid())
    threading.Thread(target=_watch, args=(parent, limit), daemon=True).start()
    from mserve.daemon import faults
    from mserve.daemon.errors import MserveError
    from mserve.daemon.worker import runtime

    faults.pause("probe")

    path, device = argv[1], argv[2]
    batching = argv[3] if len(argv) > 3 else "auto"
    transformer = os.environ.get("MSERVE_PROBE_TRANSFORMER") or None
    try:
        model = runtime.load(0, path, device, batching=batching, transformer=transformer)
    except MserveError as exc:
        out.write(json.dumps({"error": exc.message}) + "\n")
        return 1
    out.write(json.dumps(model.meta()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
