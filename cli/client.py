"""The typed client of the daemon's control API, and a minimal HTTP/1.1 client.

The CLI reaches the daemon only through ``DaemonClient``; ``check`` is the one place that
turns an error answer into an exception carrying the server's message. Stdlib only (no
http.client, no httpx) so that ``mserve list`` starts fast.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit

from mserve.daemon.errors import MserveError, error_for_status
from mserve.daemon.paths import UnsafePath, check_peer, check_socket


class DaemonUnavailable(MserveError):
    """Nothing answers on the control socket."""


def http(sock: socket.socket, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, host: str = "localhost") -> tuple[int, dict, bytes]:
    """One request on a connected socket (closed afterwards): (status, headers, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             f"Content-Length: {len(body or b'')}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:  # the daemon went away mid-command: killed, or stopped
        raise MserveError("the daemon closed the connection before answering (was it "
                          "stopped or killed?); the command may not have finished",
                          hint="see 'mserve daemon logs', then check with 'mserve list'")
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    if not status_line.startswith("HTTP/"):
        raise MserveError("the server sent a malformed answer")
    answer_headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        answer_headers[key.strip().lower()] = value.strip()
    if answer_headers.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), answer_headers, payload


def _read_headers(f) -> dict[str, str]:
    headers = {}
    while (line := f.readline().decode("latin-1").strip()):
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return headers


def _lines(f, headers: dict[str, str]):
    """The non-empty lines of a (possibly chunked) body, as they arrive."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        yield from (line for line in f if line.strip())
        return
    pending = b""
    while (size := int(f.readline().split(b";")[0], 16)) > 0:
        pending += f.read(size)
        f.readline()  # the CRLF after each chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


def check(status: int, payload: bytes):
    """The decoded JSON answer, or the server's error as an exception."""
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        data = None
    if 200 <= status < 300:
        return data
    if isinstance(data, dict) and "error" in data:
        raise error_for_status(status, str(data["error"]), data.get("hint"))
    raise error_for_status(status, f"the server answered HTTP {status}")


class DaemonClient:
    """One method per control route. ``on_not_running`` (e.g. start the daemon) is called
    once when nothing listens on the socket, then the connection is tried again."""

    def __init__(self, socket_path: str, timeout: float | None = 600, on_not_running=None):
        self.socket_path, self.timeout = socket_path, timeout
        self.on_not_running = on_not_running

    def _connect(self, timeout: float | None) -> socket.socket:
        """A connection to the daemon, checked to be this user's before anything is sent:
        the socket file (``paths.check_socket``), then the process listening on it."""
        check_socket(Path(self.socket_path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
            check_peer(sock, self.socket_path)
        except UnsafePath:
            sock.close()
            raise
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if self.on_not_running is not None:
                start, self.on_not_running = self.on_not_running, None
                start()
                return self._connect(timeout)
            raise DaemonUnavailable("the mserve daemon is not running") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot reach the daemon at {self.socket_path}: "
                                    f"{exc.strerror or exc}") from None
        return sock

    def call(self, method: str, path: str, payload: dict | None = None,
             timeout: float | None = -1):
        timeout = self.timeout if timeout == -1 else timeout
        body = json.dumps(payload).encode() if payload is not None else None
        sock = self._connect(timeout)
        try:
            status, _, data = http(sock, method, path, body,
                                   {"Content-Type": "application/json"} if body else None)
        except socket.timeout:
            raise MserveError("the daemon did not answer in time") from None
        except OSError as exc:
            raise DaemonUnavailable(f"lost the connection to the daemon: {exc}") from None
        return check(status, data)

    def stream(self, method: str, path: str, payload: dict, on_progress) -> dict:
        """A request answered with JSON lines: ``on_progress(step)`` for each progress line,
        then the final result (or the server's error as an exception)."""
        sock = self._connect(self.timeout)
        body = json.dumps(payload).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                f"Accept: application/x-ndjson\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        try:
            with sock, sock.makefile("rb") as f:
                sock.sendall(head.encode() + body)
                status = int(f.readline().split()[1])
                headers = _read_headers(f)
                if status >= 300 or "ndjson" not in headers.get("content-type", ""):
                    return check(status, f.read())
                for line in _lines(f, headers):
                    message = json.loads(line)
                    if "progress" in message:
                        on_progress(message["progress"])
                    elif "result" in message:
                        return message["result"]
                    else:
                        raise error_for_status(message.get("status", 500), message["error"],
                                               message.get("hint"))
        except (OSError, ValueError, IndexError) as exc:
            raise DaemonUnavailable(f"lost the connection to the daemon: {exc}") from None
        raise MserveError("the daemon ended the answer without a result")

    def status(self, timeout: float | None = -1) -> dict:
        return self.call("GET", "/v1/status", timeout=timeout)

    def deployments(self) -> list[dict]:
        return self.call("GET", "/v1/deployments")

    def deployment(self, name: str, detail: bool = False) -> dict:
        query = "?detail=1" if detail else ""
        return self.call("GET", f"/v1/deployments/{quote(name, safe='')}{query}")

    def deploy(self, request: dict) -> dict:
        return self.call("POST", "/v1/deployments", request)

    def rollback(self, name: str, to: int | None) -> dict:
        return self.call("POST", f"/v1/deployments/{quote(name, safe='')}/rollback", {"to": to})

    def undeploy(self, name: str) -> dict:
        return self.call("DELETE", f"/v1/deployments/{quote(name, safe='')}")

    def versions(self, name: str) -> list[dict]:
        return self.call("GET", f"/v1/deployments/{quote(name, safe='')}/versions")

    def traffic(self, name: str, split: dict | None = None,
                sticky_header: str | None = None) -> dict:
        path = f"/v1/deployments/{quote(name, safe='')}/traffic"
        if split is None and sticky_header is None:
            return self.call("GET", path)
        return self.call("POST", path, {"split": split, "sticky_header": sticky_header})

    def promote(self, name: str, version: int | None) -> dict:
        return self.call("POST", f"/v1/deployments/{quote(name, safe='')}/promote",
                         {"version": version})

    def label(self, name: str, label: str, version: int | None) -> dict:
        return self.call("POST", f"/v1/deployments/{quote(name, safe='')}/labels",
                         {"label": label, "version": version})

    def copy_artifact(self, name: str, number: int, to: str) -> dict:
        return self.call("POST", f"/v1/deployments/{quote(name, safe='')}/versions/{number}"
                         "/copy", {"to": to})

    def prune(self) -> dict:
        return self.call("POST", "/v1/prune", {})

    def events(self, name: str | None = None) -> list[dict]:
        query = f"?name={quote(name, safe='')}" if name else ""
        return self.call("GET", f"/v1/events{query}")

    def shutdown(self, keep_serving: bool = False) -> dict:
        return self.call("POST", "/v1/shutdown", {"keep_serving": keep_serving})


def request_url(url: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60,
                cafile: str | None = None):
    """A request to a deployment's port (for ``predict``): (status, headers, body).
    For https, ``cafile`` is the certificate to trust (the deployment's own)."""
    parts = urlsplit(url)
    try:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        if parts.scheme == "https":
            import ssl

            context = ssl.create_default_context(cafile=cafile)
            context.check_hostname = False  # a local self-signed certificate names no host
            sock = context.wrap_socket(sock)
    except OSError as exc:
        raise MserveError(f"cannot reach {url}: {exc.strerror or exc}") from None
    try:
        return http(sock, method, path, body, headers, host=parts.netloc)
    except OSError as exc:
        raise MserveError(f"lost the connection to {url}: {exc}") from None

