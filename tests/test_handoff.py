"""daemon/handoff.py on real sockets: a listener's waiting connections are taken out of it
and reach a receiver in another socket, which gets working connections and nothing else."""

from __future__ import annotations

import asyncio
import socket

from mserve.daemon import handoff


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def test_drain_takes_every_waiting_connection_and_closes_the_listener():
    sock = listener()
    port = sock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        taken = handoff.drain(sock)
        assert len(taken) == 5
        assert sock.fileno() == -1  # closed: the kernel routes nothing more there
        for conn in taken:
            conn.close()
    finally:
        for client in clients:
            client.close()


def test_handed_connections_reach_the_receiver_with_what_the_client_sent(tmp_path):
    path = str(tmp_path / "h.sock")
    got: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def serve(conn: socket.socket) -> None:
            conn.setblocking(True)
            got.append(conn.recv(100))
            conn.sendall(b"answer")
            conn.close()
            if len(got) == 70:
                done.set()

        receiver = handoff.Receiver(path, serve)
        receiver.start(loop)
        sock = listener()
        port = sock.getsockname()[1]
        clients = []
        for i in range(70):  # more than one datagram's worth of descriptors
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"request %d" % i)
            clients.append(client)
        conns = handoff.drain(sock)
        assert await asyncio.to_thread(handoff.send, path, conns) == 70
        assert all(c.fileno() == -1 for c in conns)  # ours closed, the receiver's live
        await asyncio.wait_for(done.wait(), 10)
        answers = [await asyncio.to_thread(c.recv, 100) for c in clients]
        for client in clients:
            client.close()
        receiver.close(loop)
        assert answers == [b"answer"] * 70

    asyncio.run(main())
    assert sorted(got) == sorted(b"request %d" % i for i in range(70))
    assert not (tmp_path / "h.sock").exists()  # closing removes the socket file


def test_a_receiver_serves_only_stream_sockets(tmp_path):
    path = str(tmp_path / "h.sock")
    served: list[socket.socket] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        receiver = handoff.Receiver(path, served.append)
        receiver.start(loop)
        odd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await asyncio.to_thread(handoff.send, path, [odd])
        sock = listener()
        client = socket.create_connection(sock.getsockname())
        await asyncio.to_thread(handoff.send, path, handoff.drain(sock))
        for _ in range(200):
            if served:
                break
            await asyncio.sleep(0.01)
        receiver.close(loop)
        client.close()

    asyncio.run(main())
    assert len(served) == 1 and served[0].type == socket.SOCK_STREAM
    served[0].close()


def test_sending_to_nobody_closes_the_connections_and_says_none_went(tmp_path):
    sock = listener()
    client = socket.create_connection(sock.getsockname())
    conns = handoff.drain(sock)
    assert handoff.send(str(tmp_path / "absent.sock"), conns) == 0
    assert all(c.fileno() == -1 for c in conns)
    client.settimeout(5)
    assert client.recv(10) == b""  # the client sees the close, not a hang
    client.close()
