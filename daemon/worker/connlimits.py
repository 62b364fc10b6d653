"""What clients may hold in a worker: time, connections and buffered body bytes (issue 13).

- **Deadlines.** A request's headers must arrive within ``header_s`` of its first byte, its body
  within ``body_s`` of the headers plus a second per ``BODY_RATE`` bytes received; past them the
  answer is 408. Neither restarts when a byte arrives, so a client trickling a byte a second
  holds a connection for ``header_s`` at most, not forever (slowloris).
- **Connections.** At most ``cap`` per worker, below the open-file limit with a reserve kept for
  model files, threads and new versions. A new connection past the cap makes room: the worker
  closes, in this order, a connection lingering after its last answer, the oldest idle
  keep-alive connection, the oldest connection still sending headers, then the slowest body
  (none younger than a second). When none can go, the newcomer gets 503.
- **Bytes.** The request bodies held by a worker (arriving, queued or being answered) add up
  to at most ``budget`` bytes; a body that would pass it gets 503 with ``Retry-After``.

The worker logs to ``mserve.worker`` when a limit bites, at most once every ``LOG_EVERY``
seconds with counts, as it does for accept errors (EMFILE) under the plain asyncio loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

from mserve.daemon.worker.wire import answer_bytes, busy, error

log = logging.getLogger("mserve.worker")
HEADER_S = 10.0
BODY_S = 60.0
BODY_RATE = 256 * 1024  # each such many bytes received give a body one more second
MAX_CONNECTIONS = 10_000
MIN_BUDGET = 64 * 2**20
LINGER_S = 2.0  # after a refusal, read and drop what the client still sends, so it sees the answer
LOG_EVERY = 10.0
TRIM_AFTER = 16 * 2**20  # bytes released before the allocator is asked to return free pages
TRIM_EVERY = 1.0
TRIM_SIZE = 128 * 1024  # only buffers this large count towards TRIM_AFTER
IDLE, HEAD, BODY, LINGER = "idle", "head", "body", "linger"
ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(slots=True)
class Limits:
    header_s: float = HEADER_S
    body_s: float = BODY_S
    max_connections: int = MAX_CONNECTIONS
    budget: int | None = None  # None: 4 x the body limit, at least MIN_BUDGET

    @classmethod
    def from_env(cls, environ=os.environ) -> Limits:
        """``MSERVE_HEADER_TIMEOUT``, ``MSERVE_BODY_TIMEOUT`` (seconds),
        ``MSERVE_MAX_CONNECTIONS`` and ``MSERVE_BODY_BUDGET_MB``; a bad value is ignored."""
        def number(name, default, kind=float):
            try:
                value = kind(environ[name])
            except (KeyError, ValueError):
                return default
            return value if value > 0 else default

        budget = number("MSERVE_BODY_BUDGET_MB", None)
        return cls(number("MSERVE_HEADER_TIMEOUT", HEADER_S),
                   number("MSERVE_BODY_TIMEOUT", BODY_S),
                   number("MSERVE_MAX_CONNECTIONS", MAX_CONNECTIONS, int),
                   None if budget is None else int(budget * 2**20))


def reserve(soft: int) -> int:
    """The file descriptors kept out of the connection cap at an open-file limit of ``soft``."""
    return min(max(128, soft // 8), 1024)


class Crowd:
    """The worker's connections by what they are doing, the bytes they hold, and the notes
    of limits that bit. Each bucket is a dict in the order its connections entered it."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.cap = limits.max_connections
        self.fd_limit = 0
        self.buckets: dict[str, dict] = {IDLE: {}, HEAD: {}, BODY: {}, LINGER: {}}
        self.held = 0  # body bytes held by every connection
        self.last_budget = 0
        self.notes: Counter[str] = Counter()
        self.logged = -LOG_EVERY
        self.flush_due = None
        self.loop = None  # set once serving: for the timers of notes and trims
        self.released, self.trim_due = 0, None
        self.accept_error = ""

    def fit(self, soft: int) -> int:
        """Cap connections below an open-file limit of ``soft`` (0: unknown)."""
        self.fd_limit = soft
        self.cap = self.limits.max_connections
        if soft > 0:
            self.cap = max(1, min(self.cap, soft - reserve(soft)))
        return self.cap

    def budget(self, max_body: int) -> int:
        return self.limits.budget or max(4 * max_body, MIN_BUDGET)

    # ---- buckets -------------------------------------------------------------------------
    def put(self, conn, bucket: str | None) -> None:
        """Move ``conn`` into ``bucket`` (None: in none, as while busy); at its end if new."""
        if conn.bucket == bucket:
            return
        if conn.bucket is not None:
            self.buckets[conn.bucket].pop(conn, None)
        if bucket is not None:
            self.buckets[bucket][conn] = None
        conn.bucket = bucket

    def victim(self, now: float):
        """The connection to close to make room, or None."""
        for bucket in (LINGER, IDLE, HEAD):
            for conn in self.buckets[bucket]:
                return conn
        slowest, rate = None, float("inf")
        for i, conn in enumerate(self.buckets[BODY]):  # oldest first
            age = now - conn.started
            if i >= 32 or age < 1.0:
                break
            if conn.received / age < rate:
                slowest, rate = conn, conn.received / age
        return slowest

    # ---- bytes ---------------------------------------------------------------------------
    def room(self, size: int, max_body: int) -> bool:
        """Whether ``size`` more bytes fit in the budget; noted when they do not."""
        if self.held + size <= self.budget(max_body):
            return True
        self.last_budget = self.budget(max_body)
        self.note("budget")
        return False

    def take(self, size: int, max_body: int) -> bool:
        if not self.room(size, max_body):
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        """``size`` bytes held are let go. Once large buffers add up to TRIM_AFTER, free pages
        go back to the system: glibc keeps freed buffers of a few MiB in its heaps otherwise."""
        self.held -= size
        if size < TRIM_SIZE:  # small buffers are reused, not stranded
            return
        self.released += size
        if self.released >= TRIM_AFTER and self.trim_due is None and self.loop is not None \
                and TRIM is not None:
            self.trim_due = self.loop.call_later(TRIM_EVERY, self._trim)

    def _trim(self) -> None:
        self.trim_due, self.released = None, 0
        self.loop.run_in_executor(None, TRIM, 0)

    # ---- notes ---------------------------------------------------------------------------
    def note(self, what: str, count: int = 1) -> None:
        """Count a limit that bit; log the counts now or at the end of this interval."""
        self.notes[what] += count
        wait = self.logged + LOG_EVERY - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self.flush_due is None and self.loop is not None:
            self.flush_due = self.loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self.flush_due = None
        if not self.notes:
            return
        notes, self.notes = self.notes, Counter()
        self.logged = time.monotonic()
        if notes["closed"] or notes["refused"]:
            log.warning("connection cap of %d reached (open-file limit %s): %d idle or slow "
                        "connections closed, %d new ones refused", self.cap,
                        self.fd_limit or "unknown", notes["closed"], notes["refused"])
        if notes["budget"]:
            log.warning("request bodies reached the worker's budget of %.0f MiB: %d refused "
                        "with 503", self.last_budget / 2**20, notes["budget"])
        if notes["timeout"]:
            log.info("%d requests timed out before their headers or body arrived (408)",
                     notes["timeout"])
        if notes["accept"]:
            log.warning("cannot accept connections: %s (%d failures; open-file limit %s)",
                        self.accept_error, notes["accept"], self.fd_limit or "unknown")


class Guarded:
    """The time and room of one connection, mixed into ``http.Connection``: its deadlines and
    keep-alive idle time on one timer, its bucket in the worker's ``Crowd``, its eviction.
    The connection sets ``phase`` (IDLE, HEAD, BODY), ``started`` (when that phase began),
    ``since`` (when it went idle or began lingering) and ``last_seen`` (its last bytes)."""

    def evict(self) -> None:
        """Close to make room for a new connection; one cut short is told so."""
        if self.phase != IDLE and not self.lingering and not self.busy:
            self.transport.write(answer_bytes(busy("too many connections")))
        self.closing = True
        self._close()

    def _close(self) -> None:
        self.crowd.put(self, None)
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # close() waits, without end, for a client that never reads its answer; the
            # descriptor (and a place under the cap) must come back anyway
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.abort)

    # ---- time --------------------------------------------------------------------------
    def _place(self) -> None:
        """Put this connection in the bucket that says how soon it may be closed."""
        if self.transport is None or self.transport.is_closing():
            bucket = None
        elif self.lingering:
            bucket = LINGER
        elif self.busy or self.waiting:
            bucket = None
        else:
            bucket = self.phase
        self.crowd.put(self, bucket)

    def _deadline(self) -> float:
        """When the request being read must have arrived (its headers, or its body)."""
        limits = self.crowd.limits
        if self.phase == HEAD:
            return self.started + limits.header_s
        return self.started + limits.body_s + len(self.body) / BODY_RATE

    def _due(self, now: float) -> float:
        """When to look at this connection next. One timer per connection, moved only
        earlier; arriving bytes move no deadline, only the keep-alive idle time."""
        keepalive = self.server.keepalive_s
        if self.lingering:
            return self.since + LINGER_S
        if self.busy or self.waiting or self.paused:
            return now + keepalive
        if self.phase == IDLE:
            return self.since + keepalive
        return min(self._deadline(), self.last_seen + keepalive)

    def _arm(self) -> None:
        if self.transport.is_closing():
            return
        due = self._due(self.loop.time())
        if self.timer is not None:
            if self.timer.when() <= due:
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        """Close a connection idle for ``keepalive_s`` between requests or done lingering;
        408 to a request past its deadline or silent for ``keepalive_s`` part-way."""
        self.timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time() + 0.005  # timers may fire a little early
        if (due := self._due(now)) > now:
            self.timer = self.loop.call_at(due, self._tick)
        elif self.lingering or self.phase == IDLE:
            self._close()
        else:
            what = "headers" if self.phase == HEAD else "body"
            self.crowd.note("timeout")
            if now < self._deadline():  # went silent part-way: told so, as at the deadline
                why = (f"the request {what} stopped arriving (nothing for "
                       f"{self.server.keepalive_s:.3g} s)")
            else:
                allowed = self._deadline() - self.started
                why = f"the request {what} did not arrive within {allowed:.3g} s"
            self._reject(error(408, why))


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


TRIM = _malloc_trim()


def watch_accept_errors(loop, crowd: Crowd, shed) -> None:
    """Under the plain asyncio loop, log accept errors (EMFILE and the like) once per interval
    instead of a traceback each time (asyncio reports one per pending connection, thousands a
    second), and call ``shed()`` to free descriptors. uvloop (libuv) accepts and closes at
    once the connections it has no descriptor for, unlogged: the cap keeps that from
    happening, since the worker's own connections never reach the open-file limit."""
    previous = loop.get_exception_handler()
    if getattr(previous, "mserve_accept", False):
        return

    def handler(loop, context):
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRORS \
                and context.get("message") == "socket.accept() out of system resource":
            crowd.accept_error = exc.strerror or str(exc)
            crowd.note("accept")
            shed()
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.mserve_accept = True
    loop.set_exception_handler(handler)
