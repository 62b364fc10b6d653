"""What gRPC clients may hold in a worker (issue 13): calls in progress and message bytes.

- **Calls.** At most ``max_calls`` calls of the inference service at once (a stream is one
  call; health calls are not counted). One more is answered RESOURCE_EXHAUSTED before its
  message is read. grpcio's own backlog of calls not yet handed to the application is raised
  well above that, so grpcio never drops calls itself: it answers those CANCELLED, which a
  client cannot tell from its own cancellation and no metric sees.
- **Bytes.** The request messages held (read, decoded, queued or running, until answered) add
  up to at most ``budget`` bytes: a message that would pass it is answered RESOURCE_EXHAUSTED
  as soon as it has been read (grpcio gives no size before) and dropped, and no read starts
  while the budget is full. With the message size limit (checked by grpcio from a message's
  length prefix, before it is buffered) and the call cap, that bounds what a worker buffers.
- **Memory back.** Once the requests held drop to none after at least ``TRIM_AFTER`` bytes
  went through, the C heap's free pages go back to the system (``malloc_trim``): grpcio
  assembles each message from many small pieces, and glibc keeps what they leave behind.
- **Message size.** ``max_message`` (``--max-body-mb``) is checked here, once a message is
  read; grpcio checks its own ceiling, at least 64 MiB, before (grpc_serve.py). So
  ``GrpcServer.resize`` changes the limit at once, for every connection.

Every refusal is counted in ``/metrics`` (``Metrics.rejected``) and logged at most once every
``LOG_EVERY`` seconds with counts; so are unexpected errors (a traceback at most that often),
and what grpcio itself logs (``quiet_grpc_logs``: a traceback for each answer it could not
send because its call had ended, a client's deadline or cancel), so that no client can flood
the worker log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

from mserve.daemon.errors import MserveError, PayloadTooLarge

log = logging.getLogger("mserve.worker")
MAX_CALLS = 1024
MIN_BUDGET = 64 * 2**20
LOG_EVERY = 10.0
TRIM_AFTER = 64 * 2**20  # request bytes that passed through before memory is given back
TRIM_DELAY_S = 0.5  # after the last of them was let go, so their answers are gone too
CALLS, BYTES = "calls", "bytes"


class Busy(MserveError):
    """A call refused by a limit of this module: RESOURCE_EXHAUSTED."""

    status = 503

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Settings:
    max_calls: int = MAX_CALLS
    budget: int | None = None  # None: 4 x the message size limit, at least MIN_BUDGET

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        """``MSERVE_GRPC_MAX_CALLS`` and ``MSERVE_GRPC_BUDGET_MB``; a bad value is ignored."""
        def number(name, kind):
            try:
                value = kind(environ[name])
            except (KeyError, ValueError):
                return None
            return value if value > 0 else None

        budget = number("MSERVE_GRPC_BUDGET_MB", float)
        return cls(number("MSERVE_GRPC_MAX_CALLS", int) or MAX_CALLS,
                   None if budget is None else int(budget * 2**20))


class Limits:
    """The calls and bytes held by one worker's gRPC servers (old and new share one)."""

    def __init__(self, settings: Settings, max_message: int, metrics):
        self.settings, self.metrics = settings, metrics
        self.max_calls = settings.max_calls
        self.max_message = self.budget = 0
        self.resize(max_message)
        self.calls = 0  # inference-service calls in progress
        self.accepted = 0  # calls the native front end took and has not answered (any service)
        self.held = 0  # request bytes held
        self.passed = 0  # request bytes seen since memory was last given back
        self.trim_due = None
        self.notes: Counter[str] = Counter()
        self.logged = -LOG_EVERY
        self.flush_due = None

    def resize(self, max_message: int) -> None:
        self.max_message = max_message
        self.budget = self.settings.budget or max(4 * max_message, MIN_BUDGET)

    def pending_backlog(self) -> int:
        """grpcio's backlog of calls accepted but not yet handed to the application."""
        return max(4 * self.max_calls, 8192)

    # ---- calls -------------------------------------------------------------------------
    def enter(self, inference: bool) -> None:
        """Count one more call in progress, or raise Busy."""
        if self.calls >= self.max_calls:
            self.refused(CALLS, inference)
            raise Busy(f"the deployment is busy: {self.calls} gRPC calls in progress, the "
                       "limit (MSERVE_GRPC_MAX_CALLS); retry shortly", CALLS)
        self.calls += 1

    def leave(self) -> None:
        self.calls -= 1

    # ---- bytes -------------------------------------------------------------------------
    def check_room(self, inference: bool) -> None:
        """Raise Busy when the budget is full (before a read)."""
        if self.held >= self.budget:
            self.refused(BYTES, inference)
            raise Busy(self._full(), BYTES)

    def take(self, size: int, inference: bool) -> None:
        """Hold ``size`` more bytes, or raise Busy (PayloadTooLarge past the size limit)."""
        if size > self.max_message:
            self.passed += size
            raise PayloadTooLarge(f"received message larger than max ({size} vs. "
                                  f"{self.max_message}); see --max-body-mb")
        if self.held + size > self.budget and size:
            self.passed += size
            self.refused(BYTES, inference)
            raise Busy(self._full(), BYTES)
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size
        self.passed += size
        if not self.held and self.passed >= TRIM_AFTER and self.trim_due is None:
            with contextlib.suppress(RuntimeError):  # no running loop (tests): no trim
                self.trim_due = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self.trim_due = None
        if self.held:  # busy again: the next time it is idle
            return
        self.passed = 0
        threading.Thread(target=give_memory_back, name="malloc-trim", daemon=True).start()

    def _full(self) -> str:
        return (f"the deployment is busy: gRPC requests hold {self.held / 2**20:.0f} MiB, "
                f"the limit is {self.budget / 2**20:.0f} MiB (MSERVE_GRPC_BUDGET_MB); "
                "retry shortly")

    # ---- notes -------------------------------------------------------------------------
    def refused(self, reason: str, inference: bool) -> None:
        self.metrics.rejected("grpc", reason, inference)
        self.note(reason)

    def unexpected(self, what: str) -> None:
        """Log an unexpected error (from an except block): its traceback at most once per
        interval, the others counted."""
        if self.note("error"):
            log.exception("unexpected error in gRPC %s", what)

    def note(self, what: str) -> bool:
        """Count a limit that bit (or an error); log the counts now when the interval has
        passed (and say True), else at its end."""
        self.notes[what] += 1
        wait = self.logged + LOG_EVERY - time.monotonic()
        if wait <= 0:
            self.flush()
            return True
        if self.flush_due is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next note logs
                self.flush_due = asyncio.get_running_loop().call_later(wait, self.flush)
        return False

    def flush(self) -> None:
        if self.flush_due is not None:
            self.flush_due.cancel()
            self.flush_due = None
        self.logged = time.monotonic()
        notes, self.notes = self.notes, Counter()
        if notes[CALLS] or notes[BYTES]:
            log.warning("gRPC limits reached: %d calls refused at %d calls in progress, %d at "
                        "%.0f MiB of requests held (RESOURCE_EXHAUSTED)", notes[CALLS],
                        self.max_calls, notes[BYTES], self.budget / 2**20)
        if notes["error"]:
            log.error("%d unexpected errors in gRPC calls since the last report (a traceback "
                      "is logged at most every %.0f s)", notes["error"], LOG_EVERY)
        if notes["grpcio"]:
            log.error("grpcio logged %d errors since the last report (one with its traceback "
                      "at most every %.0f s)", notes["grpcio"], LOG_EVERY)
        if notes["unsent"]:
            log.info("%d gRPC answers were not sent: their calls had ended (the client's "
                     "deadline or cancel)", notes["unsent"])


def quiet_grpc_logs(limits: Limits) -> None:
    """Route what grpcio logs at WARNING or above through ``limits.note`` (see the module's
    text). Once per process; a later call points the filter at ``limits``."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    for existing in logger.filters:
        if isinstance(existing, _GrpcioFilter):
            existing.limits = limits
            return
    logger.addFilter(_GrpcioFilter(limits))


class _GrpcioFilter(logging.Filter):
    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if "ExecuteBatchError" in record.getMessage():  # an answer to a call already over
            self.limits.note("unsent")
            return False
        return self.limits.note("grpcio")  # kept at most once per interval


def give_memory_back() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere nothing)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)
