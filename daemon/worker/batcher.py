"""Dynamic batching for one loaded version: a bounded queue and one runner per session.

Requests wait in a queue; a runner takes the oldest one plus every compatible request behind
it (same requested outputs, same dtypes and non-batch dims) up to ``max_batch_size`` rows,
concatenates them along dim 0, makes one ``session.run`` in a thread, and splits the outputs
back. While a batch runs, the next one forms, so under load batches grow by themselves and a
lone client never waits (``batch_delay_ms`` defaults to 0). A batch that fails is retried
request by request, so one bad request fails alone. Runs always happen in a thread (ONNX
Runtime releases the GIL): a model's run time can depend on its input (a Loop, a long
sequence), so even a usually-quick model could otherwise stall the event loop. Versions never mix: each has its own
batcher. Past ``max_queue`` waiting requests the worker answers 503 at once.
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


@dataclass(eq=False)
class Job:
    feeds: dict[str, np.ndarray]
    names: list[str]
    rows: int
    key: tuple | None  # None: never batched with others
    future: asyncio.Future
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
        self._wakeup = asyncio.Event()
        self._closing = False
        self._runners = [asyncio.create_task(self._runner(i)) for i in range(len(model.sessions))]

    async def submit(self, feeds: dict[str, np.ndarray], names: list[str],
                     call: Call | None = None) -> list[np.ndarray]:
        """Queue one request and wait for its outputs (in the order of ``names``); its queue
        time and batch size go into ``call``."""
        if len(self.pending) >= self.max_queue:
            raise Overloaded(f"the deployment is overloaded ({self.max_queue} requests queued); "
                             "retry shortly")
        job = Job(feeds, names, _rows(feeds), self._key(feeds, names),
                  asyncio.get_running_loop().create_future(), call)
        self.pending.append(job)
        self.metrics.queue_depth.inc()
        self._wakeup.set()
        try:
            return await job.future
        finally:
            self.metrics.queue_depth.dec()

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Finish what is queued, then stop the runners."""
        self._closing = True
        self._wakeup.set()

    def _key(self, feeds: dict[str, np.ndarray], names: list[str]) -> tuple | None:
        if self.max_batch == 1 or any(a.ndim == 0 for a in feeds.values()) \
                or len({a.shape[0] for a in feeds.values()}) > 1:
            return None
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
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.delay and self.pending[0].key is not None \
                    and sum(j.rows for j in self.pending) < self.max_batch:
                await asyncio.sleep(self.delay)
            batch = self._take()
            started = time.perf_counter()
            for job in batch:
                waited = started - job.queued
                self.metrics.queue_time.observe(waited)
                self.stats.queue.add(waited)
                if job.call is not None:
                    job.call.queue_ms, job.call.batch = round(waited * 1000, 3), len(batch)
            results = await loop.run_in_executor(self.executor, self._execute, batch, session)
            self.metrics.batch_size.observe(len(batch))
            self.stats.observe_run(len(batch), sum(j.rows for j in batch),
                                   time.perf_counter() - started)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _execute(self, batch: list[Job], session: int) -> list:
        """One model run for the whole batch (in a thread); per-job results or exceptions."""
        start = time.perf_counter()
        try:
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
        finally:
            self.metrics.inference_time.observe(time.perf_counter() - start)

    def _run_one(self, job: Job, session: int):
        try:
            return self.model.run(job.feeds, job.names, session)
        except Exception as exc:
            return exc


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
