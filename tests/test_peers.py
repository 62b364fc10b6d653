"""The sibling channel (peers.py) over real Unix sockets in short private folders: a sibling
with the secret gets the snapshot, anyone else gets nothing, and gather skips the siblings
that are missing, stuck or not ours."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from mserve.daemon.worker import peers
from mserve.daemon.worker.peers import PeerServer, gather
from tests.conftest import OTHER_UID, ROOT

SECRET = "s3cret"
as_root = pytest.mark.skipif(not ROOT, reason="only root can give a file to another user")


@pytest.fixture
def short_dir():
    """A private folder short enough for Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


async def ask(path: Path, line: bytes) -> bytes:
    """Send ``line`` as a client would; all the server answered before closing."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def snapshot_request(secret: str = SECRET) -> bytes:
    return orjson.dumps({"op": "snapshot", "secret": secret}) + b"\n"


def test_a_sibling_with_the_secret_gets_the_snapshot(short_dir):
    path = short_dir / "0.sock"
    path.write_text("stale")  # a dead process's socket file: replaced

    async def snapshot() -> dict:
        return {"metrics": "# text\n", "pid": 1}

    async def main():
        server = PeerServer(str(path), SECRET, snapshot)
        await server.start()
        try:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert await ask(path, snapshot_request()) == b'{"metrics":"# text\\n","pid":1}\n'
            assert await gather([str(path)], SECRET, 2.0) == [{"metrics": "# text\n", "pid": 1}]
        finally:
            server.close()
        assert not path.exists()

    asyncio.run(main())


def test_anyone_without_the_secret_gets_nothing_and_the_server_lives_on(short_dir):
    path = short_dir / "0.sock"
    calls = []

    def snapshot() -> dict:  # a plain function works as well as a coroutine
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a snapshot that fails")
        return {"ok": True}

    async def main():
        server = PeerServer(str(path), SECRET, snapshot)
        await server.start()
        try:
            for line in (snapshot_request("wrong"), snapshot_request("sécret"),
                         b'{"op": "describe", "secret": "s3cret"}\n', b"not json\n", b"[]\n",
                         b'{"op": "snapshot", "secret": 7}\n', b"x" * (70 * 2**10)):
                assert await ask(path, line) == b"", line[:40]
            assert await gather([str(path)], "wrong", 2.0) == []
            assert calls == []
            assert await ask(path, snapshot_request()) == b""  # the snapshot raised
            assert await gather([str(path)], SECRET, 2.0) == [{"ok": True}]
        finally:
            server.close()

    asyncio.run(main())


def test_a_silent_client_is_dropped_and_a_large_answer_goes_through(short_dir, monkeypatch):
    monkeypatch.setattr(peers, "REQUEST_TIMEOUT_S", 0.1)
    path = short_dir / "0.sock"
    big = {"metrics": "x" * (5 * 2**20)}  # far past asyncio's 64 KiB default line limit

    async def main():
        server = PeerServer(str(path), SECRET, lambda: big)
        await server.start()
        try:
            assert await ask(path, b"") == b""  # connects, says nothing, is closed
            assert await gather([str(path)], SECRET, 5.0) == [big]
        finally:
            server.close()

    asyncio.run(main())


def test_gather_returns_the_answers_in_time_in_order_and_skips_the_rest(short_dir):
    good, missing, stuck, other, dead, garbage = (str(short_dir / f"{n}.sock")
                                                  for n in range(6))
    never, dropped = asyncio.Event(), asyncio.Event()

    async def hang() -> dict:
        try:
            await never.wait()  # a sibling that never answers
        except asyncio.CancelledError:
            dropped.set()
            raise
        return {}

    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"[not a snapshot\n")
        writer.close()

    async def main():
        servers = [PeerServer(good, SECRET, lambda: {"n": 0}),
                   PeerServer(stuck, SECRET, hang),
                   PeerServer(other, SECRET, lambda: {"n": 3})]
        for server in servers:
            await server.start()
        with socket.socket(socket.AF_UNIX) as left:  # a socket file nobody listens on
            left.bind(dead)
        babbler = await asyncio.start_unix_server(babble, garbage)
        try:
            started = time.monotonic()
            got = await gather([other, missing, stuck, dead, garbage, good], SECRET, 0.5)
            assert time.monotonic() - started < 1.5
            assert got == [{"n": 3}, {"n": 0}]
        finally:
            babbler.close()
            for server in servers:
                server.close()
        await asyncio.wait_for(dropped.wait(), 2.0)  # close() dropped the stuck answer

    asyncio.run(main())


def test_gather_skips_a_symbolic_link_to_a_socket(short_dir):
    path, link = short_dir / "0.sock", short_dir / "link.sock"
    link.symlink_to(path)

    async def main():
        server = PeerServer(str(path), SECRET, lambda: {"n": 0})
        await server.start()
        try:
            assert await gather([str(link), str(path)], SECRET, 2.0) == [{"n": 0}]
        finally:
            server.close()

    asyncio.run(main())


@as_root
def test_gather_skips_another_users_socket(short_dir):
    path = short_dir / "0.sock"

    async def main():
        server = PeerServer(str(path), SECRET, lambda: {"n": 0})
        await server.start()
        try:
            os.chown(path, OTHER_UID, OTHER_UID)
            assert await gather([str(path)], SECRET, 2.0) == []
        finally:
            server.close()

    asyncio.run(main())
