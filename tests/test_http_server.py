"""The worker's HTTP/1.1 server (daemon/worker/http.py) on a real socket, spoken to with raw
bytes: keep-alive, pipelining, chunked bodies, 100-continue, limits, bad requests, idle
timeout, drain, and gzip/deflate bodies both ways. The routes behind it are tested through
real workers elsewhere."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
import zlib

import pytest

from mserve.daemon.errors import PayloadTooLarge
from mserve.daemon.worker import encoding, http
from mserve.daemon.worker.connlimits import Limits
from mserve.daemon.worker.http import HttpServer, Request

LIMIT = 1024
SLOW_STARTED = threading.Event()


async def echo(request: Request):
    """Describe the request; ``/slow`` takes 0.3 s."""
    if request.path == "/slow":
        SLOW_STARTED.set()
        await asyncio.sleep(0.3)
    body = json.dumps({"method": request.method, "path": request.path,
                       "size": len(request.body), "client": request.client,
                       "x": request.headers.get("x-test")}).encode()
    return 200, [(b"content-type", b"application/json")], body


class Running:
    def __init__(self, keepalive_s: float = 5.0, handler=echo, max_body: int = LIMIT,
                 limits: Limits | None = None):
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = HttpServer(handler, max_body=max_body, keepalive_s=keepalive_s,
                                 limits=limits or Limits())
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start(self.sock))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(5)

    def drain(self, seconds: float):
        return asyncio.run_coroutine_threadsafe(self.server.drain(seconds), self.loop)

    def stop(self):
        self.drain(0).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        for conn in OPEN:
            conn.close()
        OPEN.clear()


@pytest.fixture
def server():
    running = Running()
    yield running
    running.stop()


OPEN: list[socket.socket] = []  # client sockets, closed when the server stops


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    OPEN.append(conn)
    return conn


def read_response(conn: socket.socket, buffer: bytearray) -> tuple[int, dict, bytes]:
    """One response off ``conn`` (``buffer`` keeps what was read past it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers["content-length"])
    while len(rest) < size:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        rest += chunk
    buffer[:] = rest[size:]
    return status, headers, rest[:size]


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_and_pipelining_answer_in_order(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(post("/slow", b"ab") + post("/a%20b?q=1", b"abcd", "x-test: yes\r\n")
                 + b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n")
    answers = [read_response(conn, buffer) for _ in range(3)]
    docs = [json.loads(body) for _, _, body in answers]
    assert [d["path"] for d in docs] == ["/slow", "/a b", "/c"]
    assert [d["size"] for d in docs] == [2, 4, 0]
    assert docs[1]["x"] == "yes" and docs[0]["client"].startswith("127.0.0.1:")
    assert all("connection" not in headers for _, headers, _ in answers)
    conn.sendall(post("/again", b""))  # still open
    assert read_response(conn, buffer)[0] == 200
    conn.close()


def test_reading_pauses_while_too_many_body_bytes_wait(server):
    conn, buffer = connect(server.port), bytearray()
    SLOW_STARTED.clear()
    conn.sendall(post("/slow", b"") + post("/a", b"x" * LIMIT) + post("/b", b"y" * LIMIT))
    assert SLOW_STARTED.wait(5)
    (held,) = server.server.connections

    def paused():
        return held.paused and held.buffered > LIMIT

    deadline = time.monotonic() + 5
    while not paused() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert paused()
    answers = [json.loads(read_response(conn, buffer)[2]) for _ in range(3)]
    assert [(a["path"], a["size"]) for a in answers] == [("/slow", 0), ("/a", LIMIT),
                                                          ("/b", LIMIT)]
    # The server resumes reading just after it writes the last answer, on its own thread.
    deadline = time.monotonic() + 5
    while (held.paused or held.buffered) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not held.paused and held.buffered == 0


def test_chunked_body_and_100_continue(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert json.loads(read_response(conn, buffer)[2])["size"] == 5
    conn.sendall(b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                 b"expect: 100-continue\r\n\r\n")
    assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.sendall(b"xyz")
    assert json.loads(read_response(conn, buffer)[2])["size"] == 3
    conn.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413_and_closes(server, chunked):
    conn, buffer = connect(server.port), bytearray()
    body = b"x" * (LIMIT + 1)
    if chunked:
        conn.sendall(b"POST /big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    else:
        conn.sendall(post("/big", body))
    status, headers, answer = read_response(conn, buffer)
    assert status == 413 and headers["connection"] == "close"
    assert "limit" in json.loads(answer)["error"]
    assert closed(conn)
    # the server is fine afterwards
    other = connect(server.port)
    other.sendall(post("/ok", b"x" * LIMIT))
    assert read_response(other, bytearray())[0] == 200
    other.close()


def test_oversized_body_announced_with_100_continue_is_refused_before_it_is_sent(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(f"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: {LIMIT * 10}\r\n"
                 "expect: 100-continue\r\n\r\n".encode())
    status, headers, _ = read_response(conn, buffer)  # no body sent: the answer still comes
    assert status == 413 and headers["connection"] == "close"
    assert closed(conn)


@pytest.mark.parametrize("raw, why", [
    (b"NONSENSE\r\n\r\n", "malformed"),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "malformed"),
    (b"GET / HTTP/1.1\r\nx: " + b"y" * 70000 + b"\r\n\r\n", "exceed 64 KiB")])
def test_malformed_request_is_400_and_closes(server, raw, why):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(raw)
    status, _, body = read_response(conn, buffer)
    assert status == 400 and why in json.loads(body)["error"]
    assert closed(conn)


def test_http10_and_connection_close_end_the_connection(server):
    for request in (b"GET /a HTTP/1.0\r\n\r\n",
                    b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"):
        conn, buffer = connect(server.port), bytearray()
        conn.sendall(request)
        status, headers, _ = read_response(conn, buffer)
        assert status == 200 and headers["connection"] == "close"
        assert closed(conn)


def test_idle_connection_closes_after_keepalive():
    running = Running(keepalive_s=0.3)
    try:
        conn, buffer = connect(running.port), bytearray()
        conn.sendall(post("/a", b""))
        assert read_response(conn, buffer)[0] == 200
        started = time.monotonic()
        assert closed(conn)  # blocks until the server closes it
        assert 0.1 < time.monotonic() - started < 3
        # a request that stops half-way is cut too, and told why (408), headers or body
        for partial, what in ((b"POST /a HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc", "body"),
                              (b"POST /a HTTP/1.1\r\ncontent-len", "headers")):
            half = connect(running.port)
            half.sendall(partial)
            status, headers, body = read_response(half, bytearray())
            assert status == 408 and headers["connection"] == "close"
            assert f"request {what} stopped arriving" in json.loads(body)["error"]
            assert closed(half)
    finally:
        running.stop()


def test_drain_finishes_the_request_in_progress_and_refuses_new_ones(server):
    busy, idle = connect(server.port), connect(server.port)
    idle.sendall(post("/a", b""))
    assert read_response(idle, bytearray())[0] == 200
    SLOW_STARTED.clear()
    busy.sendall(post("/slow", b""))
    assert SLOW_STARTED.wait(5)  # /slow is in progress: the drain must wait for it
    draining = server.drain(5)
    status, headers, _ = read_response(busy, bytearray())
    assert status == 200 and headers["connection"] == "close"
    draining.result(5)
    assert closed(idle) and closed(busy)
    with pytest.raises(ConnectionRefusedError):
        connect(server.port)


# ---- compressed bodies (Content-Encoding, Accept-Encoding) ------------------------------
BIG = 4 * 2**20
TEXT = b"".join(b"row %d: %s\n" % (i, b"ab" * (i % 7)) for i in range(40))  # < LIMIT


async def mirror(request: Request):
    """Answer the (decoded) body as it came; ``/status/N`` answers with status N."""
    status = int(request.path.rsplit("/", 1)[1]) if request.path.startswith("/status/") else 200
    return status, [(b"content-type", b"application/octet-stream")], request.body


@pytest.fixture
def mirrored():
    running = Running(handler=mirror, max_body=BIG)
    yield running
    running.stop()


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("coding, packed", [
    ("gzip", gzip.compress(TEXT)),
    ("x-gzip", gzip.compress(TEXT)),
    ("GZIP", gzip.compress(TEXT)),
    ("deflate", zlib.compress(TEXT)),  # the zlib format, as tritonclient and curl send it
    ("deflate", raw_deflate(TEXT)),  # a raw deflate stream, as some old clients send it
    ("gzip", gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:])),  # two members
    ("identity", TEXT)])
def test_compressed_request_bodies_are_decoded(server, coding, packed):
    conn, buffer = connect(server.port), bytearray()
    for _ in range(2):  # the connection stays usable
        conn.sendall(post("/c", packed, f"content-encoding: {coding}\r\n"))
        status, _, body = read_response(conn, buffer)
        assert status == 200 and json.loads(body)["size"] == len(TEXT)
    conn.close()


def test_the_limit_applies_to_the_decompressed_size(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(post("/fits", gzip.compress(b"x" * LIMIT), "content-encoding: gzip\r\n"))
    assert json.loads(read_response(conn, buffer)[2])["size"] == LIMIT
    bomb = gzip.compress(b"\0" * LIMIT * 100)  # a few hundred bytes that inflate 100-fold
    assert len(bomb) < LIMIT
    conn.sendall(post("/bomb", bomb, "content-encoding: gzip\r\n"))
    status, headers, body = read_response(conn, buffer)
    assert status == 413 and "once decompressed" in json.loads(body)["error"]
    conn.sendall(post("/after", b""))  # the body was read whole: the connection goes on
    assert read_response(conn, buffer)[0] == 200
    conn.close()


def test_an_inflater_never_inflates_past_its_budget_or_the_limit():
    inflater = encoding.Inflater("gzip", gzip.compress(b"\0" * 10**7), limit=10**6)
    assert inflater.step(1000) is None and len(inflater.out) == 1000
    with pytest.raises(PayloadTooLarge, match="once decompressed"):
        inflater.step(10**9)
    assert len(inflater.out) == 0  # dropped at limit + 1 bytes


@pytest.mark.parametrize("coding, packed, why", [
    ("gzip", b"not gzip at all", "not valid gzip"),
    ("deflate", b"\x78\x9c not zlib", "not valid deflate"),
    ("gzip", gzip.compress(TEXT)[:-6], "truncated"),
    ("gzip", gzip.compress(TEXT) + b"junk", "not valid gzip"),
    ("deflate", zlib.compress(TEXT) + b"junk", "4 bytes after")])
def test_a_corrupt_stream_is_400(server, coding, packed, why):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(post("/bad", packed, f"content-encoding: {coding}\r\n"))
    status, _, body = read_response(conn, buffer)
    assert status == 400 and why in json.loads(body)["error"]
    conn.sendall(post("/after", b""))
    assert read_response(conn, buffer)[0] == 200
    conn.close()


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip"])
def test_an_unknown_coding_is_415(server, coding):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(post("/c", b"\x00" * 10, f"content-encoding: {coding}\r\n"))
    status, headers, body = read_response(conn, buffer)
    message = json.loads(body)["error"]
    assert status == 415 and repr(coding) in message and "gzip, deflate or identity" in message
    assert closed(conn)


def test_an_unknown_coding_announced_with_100_continue_is_refused_before_the_body(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
                 b"content-encoding: br\r\nexpect: 100-continue\r\n\r\n")
    status, headers, _ = read_response(conn, buffer)
    assert status == 415 and headers["connection"] == "close"


def test_an_empty_body_needs_no_decoding(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(b"GET /c HTTP/1.1\r\nhost: x\r\ncontent-encoding: gzip\r\n\r\n")
    status, _, body = read_response(conn, buffer)
    assert status == 200 and json.loads(body)["size"] == 0


def unpack(headers: dict, body: bytes) -> bytes:
    coding = headers.get("content-encoding")
    return {None: bytes, "gzip": gzip.decompress, "deflate": zlib.decompress}[coding](body)


@pytest.mark.parametrize("accept, coding", [
    ("gzip", "gzip"), ("deflate", "deflate"), ("gzip, deflate, br", "gzip"),
    ("gzip;q=0.5, deflate", "deflate"), ("*", "gzip"), ("br, *;q=0.1", "gzip"),
    ("gzip;q=0, deflate;q=0", None), ("gzip;q=0, *", "deflate"), ("identity", None),
    ("br", None), ("gzip;q=bad", None)])
def test_answers_come_in_the_accepted_coding(mirrored, accept, coding):
    conn, buffer = connect(mirrored.port), bytearray()
    data = TEXT * 10
    conn.sendall(post("/m/infer", data, f"accept-encoding: {accept}\r\n"))
    status, headers, body = read_response(conn, buffer)
    assert status == 200 and headers.get("content-encoding") == coding
    assert unpack(headers, body) == data
    assert (headers.get("vary") == "accept-encoding") == (coding is not None)
    conn.close()


@pytest.mark.parametrize("path, size", [
    ("/m/infer", encoding.MIN_COMPRESS - 1), ("/status/400", 5000),
    ("/v2/models/m/config", 5000),  # only inference answers: tritonclient.http.aio reads others raw
])
def test_small_answers_errors_and_metadata_go_uncompressed(mirrored, path, size):
    conn, buffer = connect(mirrored.port), bytearray()
    conn.sendall(post(path, b"e" * size, "accept-encoding: gzip\r\n"))
    _, headers, body = read_response(conn, buffer)
    assert "content-encoding" not in headers and body == b"e" * size
    conn.close()


def test_large_bodies_are_coded_off_the_event_loop(mirrored, monkeypatch):
    threads = []

    class Recording(encoding.Inflater):
        def finish(self):
            threads.append(("inflate", threading.current_thread()))
            return super().finish()

    def recording_compress(coding, body):
        threads.append(("compress", threading.current_thread()))
        return encoding.compress(coding, body)

    monkeypatch.setattr(http, "Inflater", Recording)
    monkeypatch.setattr(http, "compress", recording_compress)
    conn, buffer = connect(mirrored.port), bytearray()
    small = TEXT * 4  # over MIN_COMPRESS, under INLINE_BYTES
    conn.sendall(post("/m/infer", gzip.compress(small), "content-encoding: gzip\r\n"
                                                  "accept-encoding: gzip\r\n"))
    status, headers, body = read_response(conn, buffer)
    assert status == 200 and unpack(headers, body) == small
    assert [(what, thread is mirrored.thread) for what, thread in threads] == [
        ("compress", True)]  # decoded in one step on the loop; compressed there too
    threads.clear()
    large = TEXT * 5000  # about 1.5 MiB, under BIG
    conn.sendall(post("/m/infer", gzip.compress(large), "content-encoding: gzip\r\n"
                                                  "accept-encoding: deflate\r\n"))
    status, headers, body = read_response(conn, buffer)
    assert status == 200 and unpack(headers, body) == large
    assert [(what, thread is mirrored.thread) for what, thread in threads] == [
        ("inflate", False), ("compress", False)]
    conn.close()


async def sized(request: Request):
    """A body whose size the path names (``/n/SIZE``), the same for every method."""
    size = int(request.path.rsplit("/", 1)[1])
    return 200, [(b"content-type", b"text/plain"), (b"x-size", str(size).encode())], b"z" * size


def read_head(conn: socket.socket, buffer: bytearray) -> tuple[int, dict]:
    """The head of one answer to HEAD (no body follows it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]  # not a body left over before it
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers


@pytest.mark.parametrize("size", [0, 17, 200_000])
def test_head_sends_the_head_of_the_answer_and_no_body(size):
    running = Running(handler=sized)
    try:
        conn, buffer = connect(running.port), bytearray()
        request = f"/n/{size}"
        conn.sendall(f"HEAD {request} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        status, head = read_head(conn, buffer)
        assert status == 200 and head["content-length"] == str(size)
        assert head["x-size"] == str(size) and "connection" not in head
        # Keep-alive framing intact: the next answer on the connection is GET's, whole.
        conn.sendall(f"GET {request} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        assert bytes(buffer[:9]) in (b"", b"HTTP/1.1 "[:len(buffer)])  # no stray body
        status, got, body = read_response(conn, buffer)
        assert status == 200 and body == b"z" * size and not buffer
        assert {k: v for k, v in got.items()} == head
        # Pipelined: HEAD, GET, HEAD in one write.
        conn.sendall(b"".join(f"{m} {request} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
                              for m in ("HEAD", "GET", "HEAD")))
        assert read_head(conn, buffer) == (200, head)
        assert read_response(conn, buffer)[2] == b"z" * size
        assert read_head(conn, buffer) == (200, head)
        assert not buffer
        conn.settimeout(0.2)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # nothing more: no stray body bytes
    finally:
        running.stop()


def test_405_has_a_reason_phrase():
    assert http.encode(405, [], b"")[0].startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


# ---- limits: deadlines, the connection cap, the body budget (issue 13) -------------------
def poll(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def trickled(conn: socket.socket, first: bytes, drip: bytes, buffer: bytearray,
             within: float = 5.0) -> tuple[float, tuple[int, dict, bytes]]:
    """Send ``first``, then ``drip`` every 50 ms until an answer comes: (seconds, answer)."""
    started = time.monotonic()
    conn.sendall(first)
    conn.settimeout(0.05)
    while time.monotonic() - started < within:
        try:
            got = read_response(conn, buffer)
            return time.monotonic() - started, got
        except TimeoutError:
            conn.sendall(drip)
    raise AssertionError("no answer: the deadline moved with every byte")


@pytest.mark.parametrize("first, drip, what", [
    (b"GET /a HTTP/1.1\r\nx-a: ", b"a", b"headers"),
    (b"POST /a HTTP/1.1\r\ncontent-length: 100\r\n\r\n", b"x", b"body"),
    (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n64\r\n", b"x", b"body")])
def test_headers_and_bodies_have_deadlines_that_arriving_bytes_do_not_move(first, drip, what):
    running = Running(limits=Limits(header_s=0.4, body_s=0.4))
    try:
        conn, buffer = connect(running.port), bytearray()
        seconds, (status, headers, body) = trickled(conn, first, drip, buffer)
        assert status == 408 and headers["connection"] == "close"
        assert what in body and 0.3 < seconds < 2, (body, seconds)
        conn.settimeout(3)
        assert closed(conn)
    finally:
        running.stop()


def test_between_requests_the_keep_alive_idle_time_applies_not_the_header_deadline():
    running = Running(keepalive_s=5.0, limits=Limits(header_s=0.2))
    try:
        conn, buffer = connect(running.port), bytearray()
        for _ in range(2):
            conn.sendall(post("/a", b"x"))
            assert read_response(conn, buffer)[0] == 200
            time.sleep(0.4)
    finally:
        running.stop()


class Holding:
    """A handler whose ``/hold`` requests wait until ``release()``."""

    def __init__(self):
        self.gate: asyncio.Event | None = None
        self.holding = 0

    async def __call__(self, request: Request):
        if request.path == "/hold":
            self.gate = self.gate or asyncio.Event()
            self.holding += 1
            await self.gate.wait()
        return await echo(request)

    def release(self, running: Running):
        running.loop.call_soon_threadsafe(self.gate.set)


def test_past_the_cap_idle_then_slow_connections_make_room_and_busy_ones_do_not():
    handler = Holding()
    running = Running(handler=handler, limits=Limits(max_connections=2))
    try:
        assert running.server.crowd.cap == 2
        idle, idle_buffer = connect(running.port), bytearray()
        idle.sendall(post("/a", b""))
        assert read_response(idle, idle_buffer)[0] == 200
        slow = connect(running.port)
        slow.sendall(b"GET /a HTTP/1.1\r\nx-a: ")  # headers still arriving
        poll(lambda: len(running.server.connections) == 2)
        busy = connect(running.port)  # the idle one makes room
        busy.sendall(post("/hold", b""))
        assert closed(idle)
        poll(lambda: handler.holding == 1)
        other = connect(running.port)  # then the slow one, told why
        status, headers, body = read_response(slow, bytearray())
        assert status == 503 and headers["retry-after"] == "1" and b"too many" in body
        other.sendall(post("/hold", b""))
        poll(lambda: handler.holding == 2)
        refused = connect(running.port)  # both busy: the newcomer is refused
        status, headers, _ = read_response(refused, bytearray())
        assert status == 503 and headers["connection"] == "close" and closed(refused)
        handler.release(running)
        assert read_response(busy, bytearray())[0] == 200
        assert read_response(other, bytearray())[0] == 200
    finally:
        running.stop()


def test_bodies_held_are_bounded_per_worker_and_given_back():
    running = Running(limits=Limits(budget=2 * LIMIT))
    crowd = running.server.crowd
    try:
        partial = [connect(running.port) for _ in range(2)]
        for conn in partial:
            conn.sendall(post("/a", b"x" * LIMIT)[:-10])  # all but 10 bytes
        poll(lambda: crowd.held == 2 * (LIMIT - 10))
        late, buffer = connect(running.port), bytearray()
        late.sendall(post("/a", b"x" * LIMIT))  # refused right after its headers
        status, headers, body = read_response(late, buffer)
        assert status == 503 and headers["retry-after"] == "1" and b"bodies" in body
        partial[0].close()
        poll(lambda: crowd.held == LIMIT - 10)
        fits = connect(running.port)
        fits.sendall(post("/a", b"x" * 20))
        assert read_response(fits, bytearray())[0] == 200
        partial[1].close()
        poll(lambda: crowd.held == 0)
    finally:
        running.stop()


def test_a_closed_connection_frees_its_body_without_the_garbage_collector():
    import gc
    import weakref

    running = Running(max_body=2**20)
    gc.disable()
    try:
        conn = connect(running.port)
        conn.sendall(post("/a", b"x" * 2**20)[:-1])
        poll(lambda: running.server.crowd.held == 2**20 - 1)
        (served,) = running.server.connections
        gone = weakref.ref(served)
        del served
        conn.close()
        poll(lambda: gone() is None)  # no cycle through the parser keeps it (and its body)
        assert running.server.crowd.held == 0
    finally:
        gc.enable()
        running.stop()


def test_an_announced_body_over_the_limit_is_refused_before_it_is_read(server):
    conn, buffer = connect(server.port), bytearray()
    conn.sendall(b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: 1099511627776\r\n\r\n")
    status, headers, _ = read_response(conn, buffer)
    assert status == 413 and headers["connection"] == "close"
    conn.sendall(b"x" * 100_000)  # the server half-closed and drops what still comes
    assert closed(conn)


def test_accept_errors_are_logged_once_per_interval_and_free_descriptors(caplog):
    running = Running()
    try:
        idle = connect(running.port)
        poll(lambda: len(running.server.connections) == 1)
        handler = running.loop.get_exception_handler()
        context = {"message": "socket.accept() out of system resource",
                   "exception": OSError(24, "Too many open files")}
        with caplog.at_level("WARNING", logger="mserve.worker"):
            for _ in range(3):
                running.loop.call_soon_threadsafe(handler, running.loop, context)
            assert closed(idle)  # shed to free a descriptor
            poll(lambda: running.server.crowd.notes["accept"] == 2)
        lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
        assert lines == ["cannot accept connections: Too many open files (1 failures; "
                         f"open-file limit {running.server.crowd.fd_limit})"]
    finally:
        running.stop()


def test_the_server_raises_the_soft_fd_limit_and_caps_connections_below_it():
    import resource

    from mserve.daemon.worker.connlimits import reserve

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip("needs a finite hard limit of at least 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    running = Running(limits=Limits(max_connections=10**6))
    try:
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(hard, 1 << 20)
        limit = min(hard, 1 << 20)
        assert running.server.crowd.cap == limit - reserve(limit) < limit
    finally:
        running.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
