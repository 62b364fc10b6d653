"""The worker's HTTP/1.1 server (daemon/worker/http.py) on a real socket, spoken to with raw
bytes: keep-alive, pipelining, chunked bodies, 100-continue, limits, bad requests, idle
timeout and drain. The routes behind it are tested through real workers elsewhere."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

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
    def __init__(self, keepalive_s: float = 5.0):
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = HttpServer(echo, max_body=LIMIT, keepalive_s=keepalive_s)
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
        # a request that stops half-way is cut too
        half = connect(running.port)
        half.sendall(b"POST /a HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc")
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
