"""One JSON line per inference request, in ``logs/NAME.requests.jsonl``, rotated by size.

Fields: time, id (X-Request-ID, else the body's id, else a generated one), version, status,
latency_ms, queue_ms, batch (requests in its model run), bytes_in, bytes_out, client, and for
a version with a transformer preprocess_ms, model_ms and postprocess_ms. Tensor
contents are never written unless the deployment was deployed with ``--log-payloads``.
Lines are buffered and flushed at least once a second.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from dataclasses import dataclass

import orjson

from mserve.daemon.worker import sharedlog

log = logging.getLogger("mserve.worker")

MAX_BYTES = 16 * 2**20
BACKUPS = 3
FLUSH_BYTES = 1 << 16  # and at least once a second
PAYLOAD_MAX = 64 * 1024


@dataclass
class Call:
    """What one inference request did, filled in as it goes."""

    started: float
    request_id: str | None = None
    client: str | None = None
    version: int | None = None
    status: int = 500
    bytes_in: int = 0
    bytes_out: int = 0
    queue_ms: float | None = None
    batch: int | None = None
    error: str | None = None
    # Seconds spent decoding the request, in its model run, encoding the answer (statistics).
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
    # With a transformer: seconds in its preprocess and postprocess (None without one).
    pre_s: float | None = None
    post_s: float | None = None
    headers: dict | None = None  # the request's headers (gRPC: metadata), for a transformer
    payload_in: bytes | None = None  # kept only with --log-payloads
    payload_out: bytes | None = None


class RequestLog:
    """The deployment's request log. Every worker process of the deployment appends to the
    one file (sharedlog.py): lines are buffered and written whole, and whichever process
    sees the file past ``max_bytes`` rotates it for all."""

    def __init__(self, path: str | None, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 payloads: bool = False):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.payloads = payloads
        self._fd = sharedlog.open_append(path) if path else None
        self._lines: list[bytes] = []
        self._buffered = 0
        self._count = 0
        self._pid = f"{os.getpid():x}"
        self._second, self._stamp = -1, ""

    def write(self, call: Call, latency_s: float) -> None:
        if self._fd is None:
            return
        self._count += 1
        line = orjson.dumps({
            "time": self._now(), "id": call.request_id or f"{self._pid}-{self._count:x}",
            "version": call.version, "status": call.status,
            "latency_ms": round(latency_s * 1000, 3), "queue_ms": call.queue_ms,
            "batch": call.batch, "bytes_in": call.bytes_in, "bytes_out": call.bytes_out,
            "client": call.client, **({"error": call.error} if call.error else {}),
            **(_pipeline_times(call) if call.pre_s is not None else {}),
            **(_payloads(call) if self.payloads else {}),
        }) + b"\n"
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= FLUSH_BYTES:
            self.flush()

    def _now(self) -> str:
        """UTC time with milliseconds; the formatted second is cached (this runs per request)."""
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((t - second) * 1000):03d}Z"

    def flush(self) -> None:
        """Write the buffered lines in one append, then rotate the file if it is too big
        (or follow a rotation another process made)."""
        if self._fd is None or not self._lines:
            return
        data, self._lines, self._buffered = b"".join(self._lines), [], 0
        try:
            sharedlog.write_all(self._fd, data)
            if os.fstat(self._fd).st_size >= self.max_bytes:
                sharedlog.rotate(self.path, self.max_bytes, self.backups)
            if sharedlog.moved(self._fd, self.path):
                fd, self._fd = self._fd, sharedlog.open_append(self.path)
                os.close(fd)
        except OSError as exc:  # a full disk: the lines are lost, serving goes on
            log.warning("could not write the request log %s: %s", self.path, exc)


def _pipeline_times(call: Call) -> dict:
    """A transformer's split of the latency: preprocess, model run, postprocess."""
    return {"preprocess_ms": round(call.pre_s * 1000, 3),
            "model_ms": round(call.infer_s * 1000, 3),
            "postprocess_ms": round(call.post_s * 1000, 3) if call.post_s is not None else None}


def _payloads(call: Call) -> dict:
    """Request and response bodies (with --log-payloads): text when they are UTF-8 JSON,
    else base64; each cut at PAYLOAD_MAX bytes."""
    return {key: _text(body) for key, body in (("request", call.payload_in),
                                               ("response", call.payload_out)) if body}


def _text(body: bytes) -> dict:
    cut = body[:PAYLOAD_MAX]
    try:
        value = {"text": cut.decode("utf-8")}
    except UnicodeDecodeError:
        value = {"base64": base64.b64encode(cut).decode()}
    return {**value, "bytes": len(body), **({"truncated": True} if len(body) > PAYLOAD_MAX
                                             else {})}
