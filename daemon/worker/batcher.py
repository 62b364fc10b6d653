"""Dynamic batching for one loaded version: a bounded queue and one runner per session.

Requests wait in a queue; a runner takes the oldest one plus every compatible request behind
it (same requested outputs, same dtypes and non-batch dims) up to ``max_batch_size`` rows,
concatenates them along dim 0, makes one ``session.run`` in a thread, and splits the outputs
back. While a batch runs, the next one forms, so under load batches grow by themselves and a
lone client never waits (``batch_delay_ms`` defaults to 0). A batch that fails is retried
request by request, so one bad request fails alone. Versions never mix: each has its own
batcher. Past ``max_queue`` waiting requests the worker answers 503 at once.

Runs happen in a thread (ONNX Runtime releases the GIL) unless they are cheap: when the model
is size-bound (graphscan.py: its run time cannot depend on input values) and its measured
cost predicts under ``INLINE_MAX_S`` for the batch's size, the run is made on the event loop.
A thread hand-off costs two wake-ups each way (measured at 0.15 ms of CPU per run on a small
virtual machine, against 8 us for the run of a small model), so a cheap run made inline
costs the loop less than handing it off would; the loop is stalled for no longer than that
bound, and a model whose run time depends on values (a Loop, a Range) always runs in the
thread. A request that is alone (no other request waiting in the worker, none in this
batcher) and cheap runs at once, without queueing, unless a ``batch_delay_ms`` asks requests
to wait for company.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from mserve.daemon.errors import Unavailable
from mserve.daemon.worker.metrics import Metrics
from mserve.daemon.worker.requestlog import Call
from mserve.daemon.worker.runtime import LoadedModel
from mserve.daemon.worker.stats import VersionStats

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_QUEUE = 1024
INLINE_MAX_S = 0.001  # predicted run time under which a lone request may run on the loop


@dataclass(eq=False)
class Job:
    feeds: dict[str, np.ndarray]
    names: list[str]
    rows: int
    key: tuple | None  # None: never batched with others
    future: asyncio.Future | None  # None: run inline
    call: Call | None = None
    queued: float = field(default_factory=time.perf_counter)


class Overloaded(Unavailable):
    """The queue is full: 503 with Retry-After."""


class Batcher:
    def __init__(self, model: LoadedModel, executor: Executor, metrics: Metrics,
                 stats: VersionStats | None = None, *,
                 max_batch_size: int | None = None, batch_delay_ms: float | None = None,
                 max_queue: int | None = None):
        self.model, self.executor, self.metrics = model, executor, metrics
        self.stats = stats or VersionStats()
        self.max_batch = max(1, max_batch_size or DEFAULT_MAX_BATCH) if model.batchable else 1
        self.delay = (batch_delay_ms or 0.0) / 1000
        self.max_queue = max_queue or DEFAULT_MAX_QUEUE
        self.pending: deque[Job] = deque()
        self.inflight = 0  # submitted and not answered
        # Seconds per input element: a moving average of runs, from the load's warm run.
        self.cost: float | None = model.warm_cost
        # The loop, looked up once: on Python 3.11 every asyncio.get_running_loop() (and so
        # every asyncio.Event.wait) costs a getpid() system call, 10 % of a busy worker here.
        self.loop = asyncio.get_running_loop()
        self._idle: asyncio.Future | None = None  # what an idle runner awaits
        self._closing = False
        self._runners = [asyncio.create_task(self._runner(i)) for i in range(len(model.sessions))]

    async def submit(self, feeds: dict[str, np.ndarray], names: list[str],
                     call: Call | None = None, alone: bool = False) -> list[np.ndarray]:
        """Queue one request and wait for its outputs (in the order of ``names``); its queue
        time and batch size go into ``call``. ``alone``: the caller knows of no other request
        waiting (it may then run inline, see the module doc)."""
        if alone and not self.inflight and self._cheap(feeds):
            return self._run_inline(Job(feeds, names, _rows(feeds), None, None, call))
        if len(self.pending) >= self.max_queue:
            raise Overloaded(f"the deployment is overloaded ({self.max_queue} requests queued); "
                             "retry shortly")
        job = Job(feeds, names, _rows(feeds), self._key(feeds, names),
                  self.loop.create_future(), call)
        self.pending.append(job)
        self.inflight += 1
        self.metrics.depth += 1
        self._wake()
        try:
            return await job.future
        finally:
            self.inflight -= 1
            self.metrics.depth -= 1

    def _cheap(self, feeds: dict[str, np.ndarray]) -> bool:
        """A lone run on these inputs may skip the queue (see the module doc)."""
        return not self._closing and not self.delay and self._inline([feeds])

    def _inline(self, all_feeds) -> bool:
        """A run on these inputs is predicted under INLINE_MAX_S (size-bound models only)."""
        return (self.model.size_bound and self.cost is not None
                and self.cost * _elements(all_feeds) <= INLINE_MAX_S)

    def _run_inline(self, job: Job) -> list[np.ndarray]:
        self.metrics.inline_runs += 1
        self._starting([job])
        (result,), seconds = self._execute([job], 0)
        self._finished([job], seconds)
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Finish what is queued, then stop the runners."""
        self._closing = True
        self._wake()

    def _wake(self) -> None:
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _key(self, feeds: dict[str, np.ndarray], names: list[str]) -> tuple | None:
        if self.max_batch == 1 or any(a.ndim == 0 for a in feeds.values()) \
                or len({a.shape[0] for a in feeds.values()}) > 1:
            return None
        if len(feeds) == 1:  # the common case, without sorting
            (name, array), = feeds.items()
            return (tuple(names), name, array.dtype, array.shape[1:])
        return (tuple(names),) + tuple(sorted((k, a.dtype.str, a.shape[1:])
                                              for k, a in feeds.items()))

    def _take(self) -> list[Job]:
        """The oldest job and the compatible jobs behind it, up to max_batch rows."""
        first = self.pending.popleft()
        batch, rows = [first], first.rows
        if first.key is None:
            return batch
        kept: deque[Job] = deque()
        while self.pending and rows < self.max_batch:
            job = self.pending.popleft()
            if job.key == first.key and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
            else:
                kept.append(job)
        kept.extend(self.pending)
        self.pending = kept
        return batch

    async def _runner(self, session: int) -> None:
        loop = self.loop
        while True:
            if not self.pending:
                if self._closing:
                    return
                if self._idle is None or self._idle.done():  # shared by every idle runner
                    self._idle = loop.create_future()
                await self._idle
                continue
            if self.delay and self.pending[0].key is not None \
                    and sum(j.rows for j in self.pending) < self.max_batch:
                await asyncio.sleep(self.delay)
            batch = self._take()
            self._starting(batch)
            inline = self._inline(j.feeds for j in batch)
            if inline:
                self.metrics.inline_runs += 1
                results, seconds = self._execute(batch, session)
            else:
                results, seconds = await loop.run_in_executor(self.executor, self._execute,
                                                              batch, session)
            self._finished(batch, seconds)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            if inline:  # let the answered requests (and new ones) go before the next run
                await asyncio.sleep(0)

    def _starting(self, batch: list[Job]) -> None:
        """Account the queue time of a batch about to run."""
        started = time.perf_counter()
        for job in batch:
            waited = started - job.queued
            self.metrics.queue_time.observe(waited)
            self.stats.queue.add(waited)
            if job.call is not None:
                job.call.queue_ms, job.call.batch = round(waited * 1000, 3), len(batch)

    def _finished(self, batch: list[Job], seconds: float) -> None:
        """Account a finished run of ``seconds`` (on the loop: the figures take no lock)."""
        self.metrics.batch_size.observe(len(batch))
        self.metrics.inference_time.observe(seconds)
        self.stats.observe_run(len(batch), sum(j.rows for j in batch), seconds)
        per_element = seconds / max(1, _elements(j.feeds for j in batch))
        self.cost = per_element if self.cost is None else 0.8 * self.cost + 0.2 * per_element

    def _execute(self, batch: list[Job], session: int) -> tuple[list, float]:
        """One model run for the whole batch (in a thread): per-job results or exceptions, and
        the seconds it took."""
        start = time.perf_counter()
        results = self._results(batch, session)
        return results, time.perf_counter() - start

    def _results(self, batch: list[Job], session: int) -> list:
        if len(batch) == 1:
            return [self._run_one(batch[0], session)]
        merged = {k: np.concatenate([j.feeds[k] for j in batch]) for k in batch[0].feeds}
        try:
            outputs = self.model.run(merged, batch[0].names, session)
        except Exception:
            return [self._run_one(job, session) for job in batch]  # find the bad one
        total = sum(j.rows for j in batch)
        if any(np.ndim(o) == 0 or len(o) != total for o in outputs):
            return [self._run_one(job, session) for job in batch]  # not batch-major
        bounds = np.cumsum([0] + [j.rows for j in batch])
        return [[o[a:b] for o in outputs] for a, b in zip(bounds[:-1], bounds[1:])]

    def _run_one(self, job: Job, session: int):
        try:
            return self.model.run(job.feeds, job.names, session)
        except Exception as exc:
            return exc


def _elements(all_feeds) -> int:
    return sum(a.size for feeds in all_feeds for a in feeds.values())


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
