"""Content codings of the worker's HTTP bodies: gzip and deflate, both ways.

Requests (``Content-Encoding``): ``request_coding`` names the coding or refuses it (415), and
an ``Inflater`` decodes the body in steps of bounded output, so the body limit applies to the
*decompressed* size: a zip bomb stops at the limit and never inflates past it. The HTTP server
runs a first small step on the event loop (a small body ends there) and the rest in a thread.

Answers (``Accept-Encoding``): ``response_coding`` picks gzip or deflate from what the client
accepts, ``compress`` encodes (zlib level 1: an answer is on the latency path).

``deflate`` means the zlib format (RFC 1950), as tritonclient (``zlib.compress``), curl and
browsers send and expect it; a raw deflate stream (RFC 1951) is accepted on requests too.
Triton's ``Inference-Header-Content-Length`` counts the uncompressed body, both ways, which is
what coding the whole body below the application gives.
"""

from __future__ import annotations

import zlib

from mserve.daemon.errors import BadRequest, MserveError, PayloadTooLarge

CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
INLINE_BYTES = 64 * 1024  # work done on the event loop: bytes inflated, or bytes compressed
THREAD_STEP = 1024 * 1024  # bytes inflated per part in the thread
MIN_COMPRESS = 1024  # smaller answers go out as they are
LEVEL = 1
WBITS = {"gzip": 31, "deflate": 15}  # zlib's window bits: 16 + 15 = gzip container


class UnsupportedEncoding(MserveError):
    status = 415


def request_coding(value: str) -> str | None:
    """The coding a ``Content-Encoding`` value names: "gzip", "deflate", or None (identity)."""
    coding = value.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in CODINGS:
        return CODINGS[coding]
    raise UnsupportedEncoding(f"Content-Encoding {value!r} is not supported: "
                              "send the body as gzip, deflate or identity")


def response_coding(accept: str) -> str | None:
    """The coding to answer with for an ``Accept-Encoding`` value: gzip or deflate, whichever
    has the higher weight (gzip on a tie; ``*`` stands for both), or None."""
    weights = {}
    for item in accept.split(","):
        name, _, params = item.partition(";")
        weights[name.strip().lower()] = _quality(params)
    star = weights.get("*", 0.0)
    gzip_q = weights.get("gzip", weights.get("x-gzip", star))
    deflate_q = weights.get("deflate", star)
    if max(gzip_q, deflate_q) <= 0:
        return None
    return "gzip" if gzip_q >= deflate_q else "deflate"


def _quality(params: str) -> float:
    """The ``q`` weight in an Accept-Encoding item's parameters (1 when absent, 0 if bad)."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def compress(coding: str, body: bytes) -> bytes:
    """``body`` in ``coding`` (gzip or deflate, that is zlib)."""
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, WBITS[coding])
    return packer.compress(body) + packer.flush()


class Inflater:
    """Decodes one compressed request body in steps; ``step`` returns it once complete.

    Output is produced ``max_length`` bytes at a time, so no step inflates more than it was
    given room for, and the total never passes ``limit`` + 1 bytes (the one that proves the
    body too large). It collects in one bytearray, which grows in place (a large one is its
    own mapping, given back to the system when it is freed: a refused bomb leaves no heap
    behind). gzip members that follow each other form one body, as gzip has it."""

    __slots__ = ("coding", "limit", "data", "stream", "out")

    def __init__(self, coding: str, data: bytes, limit: int):
        self.coding, self.limit, self.data = coding, limit, data
        self.stream = zlib.decompressobj(_window(coding, data))
        self.out = bytearray()

    def step(self, budget: int) -> bytes | None:
        """Inflate up to ``budget`` more bytes: the whole body once the stream ends, else
        None. Raises PayloadTooLarge past the limit, BadRequest for a corrupt stream."""
        while budget > 0:
            room = min(budget, self.limit + 1 - len(self.out))
            try:
                part = self.stream.decompress(self.data, room)
            except zlib.error as exc:
                raise BadRequest(f"the request body is not valid {self.coding} data "
                                 f"({exc})") from None
            self.data = self.stream.unconsumed_tail
            self.out += part
            budget -= len(part)
            if len(self.out) > self.limit:
                self.out = bytearray()
                raise PayloadTooLarge(f"request body exceeds the limit of "
                                      f"{self.limit / 2**20:g} MiB once decompressed")
            if self.stream.eof and not self._next_member():
                body, self.out = bytes(self.out), bytearray()
                return body
            if not part and not self.data and not self.stream.eof:
                raise BadRequest(f"the request body ends inside its {self.coding} stream "
                                 "(truncated)")
        return None

    def finish(self) -> bytes:
        """The remaining steps, in parts of THREAD_STEP bytes (for a thread): the body."""
        while (body := self.step(THREAD_STEP)) is None:
            pass
        return body

    def _next_member(self) -> bool:
        """After the end of a stream: start the next gzip member, if bytes follow."""
        rest = self.stream.unused_data
        if not rest.strip(b"\0"):  # nothing, or gzip's zero padding
            return False
        if self.coding != "gzip":
            raise BadRequest(f"the request body has {len(rest)} bytes after its "
                             f"{self.coding} stream")
        self.stream, self.data = zlib.decompressobj(WBITS["gzip"]), rest
        return True


def _window(coding: str, data: bytes) -> int:
    """zlib's wbits for a body: gzip; deflate as zlib (RFC 1950 header) or raw (RFC 1951)."""
    if coding == "gzip":
        return WBITS["gzip"]
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        return WBITS["deflate"]
    return -15
