"""One deployment's worker processes as one (``--workers N``).

N processes share the deployment's HTTP and gRPC ports (SO_REUSEPORT: the kernel spreads new
connections over them), each with its own sessions, batcher and control link. The deployment
layer talks to the group as it would to one worker: a command goes to every process that
serves, concurrently, so a version is loaded and warmed in all before any is told to switch
(``load`` everywhere, then ``activate`` everywhere), and a load that fails in any one fails
the deploy while all keep the old version. A process that is gone (crashed, being restarted)
is left out: it starts again from the state, which the daemon records only after the others
switched, under the deployment's lock. Figures (``stats``) are the sum over the processes.
"""

from __future__ import annotations

import asyncio
import os

from mserve.daemon.errors import Unavailable
from mserve.daemon.worker.stats import EDGES, percentile_ms

READY, LOADING, FAILED, STOPPED = "ready", "loading", "failed", "stopped"


def worker_count(option) -> int:
    """The processes a deployment runs: its ``workers`` option, ``auto`` being the cores this
    process may run on."""
    if option == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)
    return int(option or 1)


class WorkerGroup:
    """The processes (``WorkerProcess``, supervisor.py) of one deployment, by index."""

    def __init__(self, name: str):
        self.name = name
        self.replicas: list = []
        self.peer_secret: str | None = None  # the processes' own, to ask each other

    def serving(self) -> list:
        """The processes that run and answer commands now."""
        return [w for w in self.replicas if w.status == READY and w.pid is not None]

    @property
    def status(self) -> str:
        """``ready`` while any process serves (the others are restarting), else the worst."""
        if self.serving():
            return READY
        states = {w.status for w in self.replicas}
        return next((s for s in (FAILED, LOADING, STOPPED) if s in states), LOADING)

    @property
    def error(self) -> str | None:
        errors = [(w.index, w.error) for w in self.replicas if w.error]
        if not errors:
            return None
        if len(self.replicas) == 1:
            return errors[0][1]
        return "; ".join(f"process {i}: {e}" for i, e in errors)

    @property
    def pid(self) -> int | None:
        """The first serving process's pid (one of ``pids``), else any process's."""
        return next((p for p in self.pids if p is not None),
                    next((w.pid for w in self.replicas if w.pid is not None), None))

    @property
    def pids(self) -> list[int | None]:
        """Each process's pid; None for one not serving (being started or restarted)."""
        return [w.pid if w.status == READY else None for w in self.replicas]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.replicas)

    async def request(self, op: str, timeout: float, **fields) -> dict:
        """Send ``op`` to every serving process at once. The first refusal is raised; a
        process that went away meanwhile is left out (it restarts from the state). The reply
        of the first process, or for ``stats`` and ``ping`` the group's."""
        targets = self.serving()
        if not targets:
            raise Unavailable(f"the worker of '{self.name}' is not running")
        replies = await asyncio.gather(*(w.request(op, timeout, **fields) for w in targets),
                                       return_exceptions=True)
        answered = []
        for worker, reply in zip(targets, replies):
            if isinstance(reply, Unavailable) and worker.pid is None:
                continue  # it died meanwhile: the supervisor restarts it from the state
            if isinstance(reply, Exception) and op == "stats":
                continue  # figures: a stuck process is left out, the health check acts
            if isinstance(reply, BaseException):
                raise reply
            answered.append(reply)
        if not answered:
            raise Unavailable(f"the worker of '{self.name}' is not running")
        if op == "stats":
            return merge_stats(answered)
        if op == "ping":  # what every process has: what is missing anywhere gets loaded
            loaded = set.intersection(*(set(r["loaded"]) for r in answered))
            return {**answered[0], "loaded": sorted(loaded)}
        return answered[0]

    async def stop(self, timeout: float) -> None:
        await asyncio.gather(*(w.stop(timeout) for w in self.replicas),
                             return_exceptions=True)

    async def kill(self) -> None:
        await asyncio.gather(*(w.kill() for w in self.replicas), return_exceptions=True)

    def close_link(self) -> None:
        for w in self.replicas:
            w.close_link()


def merge_stats(replies: list[dict]) -> dict:
    """The processes' ``stats`` as one: counts and memory summed, percentiles over the
    merged last-minute histograms, and each process's own line under ``processes``."""
    first = replies[0]
    hist = [0] * (len(EDGES) + 1)
    for reply in replies:
        for index, count in (reply.get("hist_1m") or {}).items():
            hist[int(index)] += count
    requests = sum(r.get("requests_1m", 0) for r in replies)
    errors = sum(r.get("errors_1m", 0) for r in replies)
    versions: dict[str, dict] = {}
    for reply in replies:
        for number, summary in (reply.get("versions") or {}).items():
            versions[number] = _sum_version(versions.get(number), summary)
    rss = [r.get("rss_bytes") for r in replies]
    return {
        "active": first.get("active"), "loaded": first.get("loaded"),
        "rss_bytes": sum(rss) if None not in rss else None,
        "requests_1m": requests, "errors_1m": errors,
        "error_rate_1m": round(errors / requests, 4) if requests else 0.0,
        "p50_ms_1m": percentile_ms(hist, 0.50), "p99_ms_1m": percentile_ms(hist, 0.99),
        "versions": versions,
        "processes": [{"pid": r.get("pid"), "requests_1m": r.get("requests_1m", 0),
                       "rss_bytes": r.get("rss_bytes")} for r in replies],
    }


def _sum_version(total: dict | None, one: dict) -> dict:
    if total is None:
        return dict(one)
    done = total["requests"] + one["requests"]
    errors = total["errors"] + one["errors"]
    means = [(s["mean_ms"], s["requests"] - s["errors"]) for s in (total, one)
             if s.get("mean_ms") is not None]
    weight = sum(n for _, n in means)
    return {"requests": done, "errors": errors,
            "error_rate": round(errors / done, 4) if done else 0.0,
            "mean_ms": round(sum(m * n for m, n in means) / weight, 3) if weight else None}

