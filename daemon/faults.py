"""Named pause points for the fault tests: with ``MSERVE_TEST_PAUSE=<point>`` in its
environment the daemon stops at that point (logging it) so a test can ``kill -9`` it there.
Points: ``during-copy`` (half a model is in the store's temporary folder), ``after-copy``
(the artifact is stored, no row refers to it yet); in the daemon's children, which inherit
its environment: ``probe`` (the validation child, before loading) and ``worker-load`` (a
worker, before loading its versions).

``MSERVE_TEST_REFUSE=load@I``: worker process I of a deployment (``--workers``) refuses every
version the daemon asks it to load, as one process short of memory would."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("mserve.daemon")


def pause(point: str) -> None:
    if os.environ.get("MSERVE_TEST_PAUSE") == point:
        log.warning("pausing at %s (MSERVE_TEST_PAUSE) until killed", point)
        time.sleep(3600)


def refused(point: str, replica: int) -> str | None:
    """The refusal ``MSERVE_TEST_REFUSE`` asks of process ``replica`` at ``point``, if any."""
    if os.environ.get("MSERVE_TEST_REFUSE") == f"{point}@{replica}":
        return f"process {replica} refused to {point} (MSERVE_TEST_REFUSE)"
    return None
