"""Is a worker still answering? A bounded ping on its control link and an HTTP probe of its
port (``GET /v2/health/live``). A worker that is alive but fails both ways, several times in
a row (stopped with SIGSTOP, wedged in native code, its event loop blocked), is killed by the
supervisor and restarted like a crashed one, with the reason recorded."""

from __future__ import annotations

import asyncio
import ssl

from mserve.daemon import envnumbers
from mserve.daemon.errors import MserveError


def interval_s() -> float:
    return envnumbers.number("MSERVE_HEALTH_INTERVAL", 2.0, minimum=0.01)


def timeout_s() -> float:
    return envnumbers.number("MSERVE_HEALTH_TIMEOUT", 3.0, minimum=0.01)


def failures_allowed() -> int:
    """Consecutive failed checks after which the worker is replaced."""
    return int(envnumbers.number("MSERVE_HEALTH_FAILURES", 3, minimum=1, integer=True))


async def problem(worker, timeout: float, http: bool = True) -> str | None:
    """None when the worker answers its control link and (with ``http``) its HTTP port in
    time, else what failed."""
    try:
        await worker.request("ping", timeout)
    except MserveError as exc:
        return f"control ping: {exc.message}"
    if worker.endpoint is None or not http:
        return None
    host, port, tls = worker.endpoint
    try:
        status = await asyncio.wait_for(_http_live(host, port, tls), timeout)
    except asyncio.TimeoutError:
        return f"HTTP probe of port {port}: no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return f"HTTP probe of port {port}: {exc}"
    if status != 200:
        return f"HTTP probe of port {port}: status {status}"
    return None


async def _http_live(host: str, port: int, tls: bool) -> int:
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(probe_host(host), port, ssl=context)
    try:
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: mserve\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:40]!r}")
    return int(parts[1])


def probe_host(host: str) -> str:
    """Where to reach a port bound to ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
