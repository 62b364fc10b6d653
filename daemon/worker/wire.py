"""What the worker's HTTP server reads and writes: the ``Request`` it hands to the app, the
``Response`` it gets back, the bytes of an answer, and the error answers the server itself
gives (413, 503, 408 and the like), all in the one error shape ``{"error": "..."}``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mserve.daemon.errors import MserveError
from mserve.daemon.protocol.codecs import encode_error

REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           415: b"Unsupported Media Type", 500: b"Internal Server Error",
           503: b"Service Unavailable"}
JSON_TYPE = b"application/json"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes | bytearray  # a large body is the buffer it arrived in (no copy)
    client: str | None
    coding: str | None = None  # the body's Content-Encoding until it is decoded


# (status, extra header lines as (name, value) bytes pairs, body)
Response = tuple[int, list[tuple[bytes, bytes]], bytes]
Handler = Callable[[Request], Awaitable[Response]]


def encode(status: int, headers: list[tuple[bytes, bytes]], body: bytes,
           close: bool = False, head: bool = False) -> list[bytes]:
    """The answer as the byte strings to write (head and body together when small).
    ``head``: the answer to HEAD, its Content-Length that of ``body``, which is not sent."""
    lines = [b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n"
             % (status, REASONS.get(status, b"Unknown"), len(body))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if head:
        return [b"".join(lines)]
    if len(body) <= 65536:
        lines.append(body)
        return [b"".join(lines)]
    return [b"".join(lines), body]


def error(status: int, message: str, *extra: tuple[bytes, bytes]) -> Response:
    return status, [(b"content-type", JSON_TYPE), *extra], encode_error(message)


def from_exception(exc: MserveError) -> Response:
    return error(exc.status, exc.message)


def too_large(limit: int) -> Response:
    return error(413, f"request body exceeds the limit of {limit / 2**20:g} MiB")


def busy(why: str) -> Response:
    """503 for a limit of the worker's that a retry a moment later may well pass."""
    return error(503, f"{why}: retry shortly", (b"retry-after", b"1"))


def answer_bytes(response: Response) -> bytes:
    """The whole of an answer the connection closes after."""
    return b"".join(encode(*response, close=True))
