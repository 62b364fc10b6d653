"""The worker's HTTP routes that answer from what it serves, not from a model run: health,
server and model metadata, Triton's model configuration, statistics and repository extensions,
``/metrics`` and TF Serving's model status. Inference routes are in app.py.

Each function takes the ``Serving`` and answers ``(status, body, headers)``, raising an
MserveError for app.py's error mapping.
"""

from __future__ import annotations

import re
from importlib.metadata import version as _dist_version
from typing import TYPE_CHECKING

import orjson

from mserve.daemon.errors import BadRequest, MserveError, NotFound, Unavailable
from mserve.daemon.protocol.modelconfig import model_config, repository_index
from mserve.daemon.protocol import codecs

if TYPE_CHECKING:
    from mserve.daemon.worker.serving import Serving
    from mserve.daemon.worker.runtime import LoadedModel

JSON = [(b"content-type", b"application/json")]
V2_MODEL = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+)"
                      r"|/labels/(?P<label>[^/]+))?(?P<op>/ready|/infer|/stats|/config)?")
V1_MODEL = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)"
                      r"|/labels/(?P<label>[^/:]+))?(?P<op>:predict)?")
REPOSITORY_MODEL = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<op>load|unload)")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
GET_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/v1/models",
                       "/v2/models/stats"})
GET_ALLOW, POST_ALLOW = "GET, HEAD", "POST"
MANAGED = "mserve manages versions itself: use 'mserve deploy' / 'mserve rollback'"
try:
    SERVER_VERSION = _dist_version("mserve")
except Exception:  # running from a source tree without an install
    SERVER_VERSION = "0+unknown"
SERVER_METADATA = {"name": "mserve", "version": SERVER_VERSION,
                   "extensions": ["binary_tensor_data", "statistics", "model_configuration",
                                  "model_repository"]}


class MethodNotAllowed(MserveError):
    """A known route asked with a method it does not answer; ``allow`` lists those it does."""

    status = 405

    def __init__(self, method: str, path: str, allow: str):
        super().__init__(f"{method} is not allowed on {path}; use {allow}")
        self.allow = allow


def allowed(path: str) -> str | None:
    """The methods (an ``Allow`` value) a known route answers; None: no such route."""
    if path in GET_PATHS:
        return GET_ALLOW
    if m := V2_MODEL.fullmatch(path):
        return POST_ALLOW if m["op"] == "/infer" else GET_ALLOW
    if m := V1_MODEL.fullmatch(path):
        return POST_ALLOW if m["op"] else GET_ALLOW
    if path == "/v2/repository/index" or REPOSITORY_MODEL.fullmatch(path):
        return POST_ALLOW
    return None


def unrouted(method: str, path: str) -> MserveError:
    """The error for ``method path`` that no route answered: 405 on a known route, else 404."""
    allow = allowed(path)
    if allow is None:
        return NotFound(f"no route for {method} {path}")
    return MethodNotAllowed(method, path, allow)


async def get(s: Serving, path: str):
    """Answer ``GET path``. Metrics and statistics are the deployment's: with several
    worker processes, this one asks the others (siblings.py)."""
    if path == "/v2/health/live":
        return _json({"live": True})
    if path == "/v2/health/ready":
        if s.active is None:
            raise Unavailable("no version is loaded yet")
        if s.leaving:  # set by main.Grace on SIGTERM; serving goes on
            raise Unavailable(f"'{s.name}' is shutting down: send new traffic elsewhere")
        return _json({"ready": True})
    if path == "/v2":
        return _json(SERVER_METADATA)
    if path == "/metrics":
        return 200, await s.siblings.metrics(), [(b"content-type",
                                                   s.metrics.content_type.encode())]
    if path == "/v1/models":
        return _json({"models": [s.name]})
    if path == "/v2/models/stats":
        return _json({"model_stats": await s.siblings.statistics(None)})
    if (m := V2_MODEL.fullmatch(path)) and m["op"] != "/infer":
        if m["op"] == "/stats":
            return _json({"model_stats": await _statistics(s, m)})
        document, number = _v2_model(s, m)
        status, body, headers = _json(document)
        return status, body, [*headers, (b"x-model-version", str(number).encode())]
    if (m := V1_MODEL.fullmatch(path)) and not m["op"]:
        return _json(v1_status(s, m["name"], m["version"], m["label"]))
    raise unrouted("GET", path)


async def _statistics(s: Serving, m: re.Match) -> list[dict]:
    pinned = m["version"] is not None or m["label"] is not None
    model = s.model(m["name"], m["version"], m["label"]) if pinned else _active(s, m["name"])
    return await s.siblings.statistics(model.number if pinned else None)


def _v2_model(s: Serving, m: re.Match) -> tuple[dict, int]:
    """A model's metadata, readiness or configuration, and the version that answered (the
    pinned one, or the active one): X-Model-Version, as every answer of a chosen version."""
    pinned = m["version"] is not None or m["label"] is not None
    model = s.model(m["name"], m["version"], m["label"]) if pinned else _active(s, m["name"])
    if m["op"] == "/ready":
        return {"name": s.name, "ready": True}, model.number
    if m["op"] == "/config":
        return model_config(s.name, model, s.options, versions=sorted(s.models)), model.number
    return codecs.model_metadata(s.name, [str(n) for n in sorted(s.models)], model.inputs,
                                 model.outputs), model.number


def _active(s: Serving, name: str) -> LoadedModel:
    """The active version (what an unpinned GET describes, whatever the traffic split)."""
    s.check_name(name)
    if s.active is None or s.active not in s.models:
        raise Unavailable(f"model '{name}' is not ready")
    return s.models[s.active]


def v1_status(s: Serving, name: str, version: str | None, label: str | None) -> dict:
    """TF Serving's GetModelStatus answer."""
    s.check_name(name)
    pinned = version or label
    chosen = [s.model(name, version, label).number] if pinned else sorted(s.models)
    statuses = [{"version": str(n), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}} for n in chosen]
    return {"name": name, "ready": s.active is not None, "model_version_status": statuses}


def repository(s: Serving, path: str, body: bytes):
    """Triton's model repository extension: the index, and load/unload refused with a
    pointer to the commands that manage versions. None: not a repository path."""
    if path == "/v2/repository/index":
        query = codecs.load_json_object(body) if body.strip() else {}
        ready = query.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest("'ready' must be a boolean")
        return _json(repository_index(s.name, [(n, "READY") for n in sorted(s.models)]))
    if m := REPOSITORY_MODEL.fullmatch(path):
        s.check_name(m["name"])
        raise BadRequest(MANAGED)
    return None


def _json(obj) -> tuple[int, bytes, list]:
    return 200, orjson.dumps(obj), JSON
