"""HEAD, 405 and canonical version numbers through a real daemon and worker (issue 13)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from tests import models

pytestmark = pytest.mark.e2e

NAME = "headm"


@pytest.fixture(scope="module")
def url(shared, model_dir):
    path = models.affine(model_dir / "headm.onnx", scale=2.0)
    yield shared.json("deploy", path, "--name", NAME)["deployment"]["url"]
    shared.run("undeploy", NAME)


def _read(conn: socket.socket, buffer: bytearray, body: bool) -> tuple[int, dict, bytes]:
    """One answer off ``conn``; its body only when ``body`` (HEAD has none)."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        assert chunk, "closed before an answer"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers["content-length"]) if body else 0
    while len(rest) < size:
        chunk = conn.recv(65536)
        assert chunk, "closed inside a body"
        rest += chunk
    buffer[:] = rest[size:]
    return int(lines[0].split()[1]), headers, rest[:size]


def _ask(conn: socket.socket, method: str, path: str) -> None:
    conn.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())


GET_ROUTES = ["/v2/health/live", "/v2/health/ready", "/v2", "/v1/models", "/v2/models/stats",
              f"/v2/models/{NAME}", f"/v2/models/{NAME}/ready", f"/v2/models/{NAME}/config",
              f"/v2/models/{NAME}/stats", f"/v2/models/{NAME}/versions/1",
              f"/v2/models/{NAME}/versions/1/ready", f"/v2/models/{NAME}/versions/1/config",
              f"/v2/models/{NAME}/versions/1/stats", f"/v1/models/{NAME}",
              f"/v1/models/{NAME}/versions/1",
              "/v2/models/other", f"/v2/models/{NAME}/versions/9"]  # errors: HEAD like GET too


def test_head_answers_like_get_without_a_body_on_one_connection(url):
    where = urlsplit(url)
    conn = socket.create_connection((where.hostname, where.port), timeout=10)
    buffer = bytearray()
    try:
        for path in GET_ROUTES:
            _ask(conn, "HEAD", path)
            head = _read(conn, buffer, body=False)
            _ask(conn, "GET", path)  # the same connection: HEAD left it framed
            got = _read(conn, buffer, body=True)
            assert head[:2] == got[:2], path
            assert int(got[1]["content-length"]) == len(got[2]) > 0, path
            assert "connection" not in got[1], path
        assert head[0] == got[0] == 404  # the last route
        # /metrics changes between two requests: same status and type, a body only for GET.
        _ask(conn, "HEAD", "/metrics")
        status, headers, _ = _read(conn, buffer, body=False)
        assert status == 200 and int(headers["content-length"]) > 0
        _ask(conn, "GET", "/metrics")
        status, got_headers, body = _read(conn, buffer, body=True)
        assert status == 200 and b"mserve_" in body
        assert got_headers["content-type"] == headers["content-type"]
        _ask(conn, "GET", "/v2/health/live")
        assert _read(conn, buffer, body=True)[0] == 200
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # no stray bytes left on the connection
    finally:
        conn.close()


def test_head_through_an_http_client(url):
    with httpx.Client(base_url=url) as c:
        for path in (f"/v2/models/{NAME}", "/v2/health/ready", f"/v1/models/{NAME}"):
            head, get = c.head(path), c.get(path)
            assert head.status_code == get.status_code == 200
            assert head.content == b"" and head.headers == get.headers


@pytest.mark.parametrize("method, path, allow", [
    ("HEAD", f"/v2/models/{NAME}/infer", "POST"),
    ("HEAD", f"/v2/models/{NAME}/versions/1/infer", "POST"),
    ("HEAD", f"/v1/models/{NAME}:predict", "POST"),
    ("GET", f"/v2/models/{NAME}/infer", "POST"),
    ("PATCH", f"/v2/models/{NAME}/infer", "POST"),
    ("PUT", f"/v1/models/{NAME}/versions/1:predict", "POST"),
    ("DELETE", f"/v2/models/{NAME}", "GET, HEAD"),
    ("PUT", "/v2/health/live", "GET, HEAD"),
    ("OPTIONS", "/metrics", "GET, HEAD"),
    ("DELETE", f"/v1/models/{NAME}", "GET, HEAD"),
    ("POST", "/v2/health/ready", "GET, HEAD"),
    ("PUT", "/v2/repository/index", "POST"),
])
def test_known_routes_answer_405_with_allow(url, method, path, allow):
    r = httpx.request(method, url + path)
    assert r.status_code == 405, (method, path, r.status_code, r.text)
    assert r.headers["allow"] == allow
    if method == "HEAD":
        assert r.content == b"" and int(r.headers["content-length"]) > 0
    else:
        assert method in r.json()["error"] and path in r.json()["error"]


def test_unknown_routes_stay_404(url):
    assert httpx.request("DELETE", url + "/nope").status_code == 404
    assert httpx.head(url + "/nope").status_code == 404
    assert httpx.post(url + "/v2/repository/nope").status_code == 404


BAD_VERSIONS = [("%201", " 1"), ("1%20", "1 "), ("+1", "+1"), ("01", "01"), ("001", "001"),
                ("0_1", "0_1"), ("%2B1", "+1"),
                ("1_0", "1_0"), ("-1", "-1"), ("0", "0")]  # the last three: int() gives no 1
INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _bad(r: httpx.Response, given: str) -> None:
    assert r.status_code == 404, (given, r.status_code, r.text)
    assert f"version '{given}' of model '{NAME}'" in r.json()["error"], r.text


@pytest.mark.parametrize("raw, given", BAD_VERSIONS)
def test_only_canonical_version_numbers_name_a_version(url, raw, given):
    v2 = f"{url}/v2/models/{NAME}/versions/{raw}"
    for suffix in ("", "/ready", "/config", "/stats"):
        _bad(httpx.get(v2 + suffix), given)
    _bad(httpx.post(v2 + "/infer", json=INFER), given)
    v1 = f"{url}/v1/models/{NAME}/versions/{raw}"
    _bad(httpx.get(v1), given)
    _bad(httpx.post(v1 + ":predict", json={"instances": [[1, 2, 3, 4]]}), given)


def test_version_1_itself_still_works(url):
    v2 = f"{url}/v2/models/{NAME}/versions/1"
    for suffix in ("", "/ready", "/config", "/stats"):
        assert httpx.get(v2 + suffix).status_code == 200, suffix
    r = httpx.post(v2 + "/infer", json=INFER)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
    v1 = f"{url}/v1/models/{NAME}/versions/1"
    assert httpx.get(v1).json()["model_version_status"][0]["version"] == "1"
    r = httpx.post(v1 + ":predict", json={"instances": [[1, 2, 3, 4]]})
    assert r.status_code == 200 and r.json()["predictions"] == [[2.0, 4.0, 6.0, 8.0]]
