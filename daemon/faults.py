"""Named pause points for the fault tests: with ``MSERVE_TEST_PAUSE=<point>`` in its
environment the daemon stops at that point (logging it) so a test can ``kill -9`` it there.
Points: ``during-copy`` (half a model is in the store's temporary folder), ``after-copy``
(the artifact is stored, no row refers to it yet); in the daemon's children, which inherit
its environment: ``probe`` (the validation child, before loading) and ``worker-load`` (a
worker, before loading its versions)."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("mserve.daemon")


def pause(point: str) -> None:
    if os.environ.get("MSERVE_TEST_PAUSE") == point:
        log.warning("pausing at %s (MSERVE_TEST_PAUSE) until killed", point)
        time.sleep(3600)
