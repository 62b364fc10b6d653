"""The control API: HTTP over the daemon's private Unix socket, used only by the CLI.

Thin handlers over ``Deployments``; every ``MserveError`` becomes ``{"error": ...}`` with
its status in one handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from importlib.metadata import version as dist_version

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mserve.daemon.deployments import Deployments
from mserve.daemon.errors import BadRequest, MserveError
from mserve.daemon.rollout import Rollouts

log = logging.getLogger("mserve.daemon")


def _version() -> str:
    try:
        return dist_version("mserve")
    except Exception:
        return "0+unknown"


def build_app(deployments: Deployments, socket_path: str, on_shutdown) -> Starlette:
    started = time.time()
    rollouts = Rollouts(deployments)

    async def status(request: Request):
        return JSONResponse({
            "running": True, "pid": os.getpid(), "socket": socket_path, "version": _version(),
            "home": str(deployments.paths.home), "uptime_s": round(time.time() - started, 1),
            "deployments": len(deployments.state.deployments()),
        })

    async def list_deployments(request: Request):
        if request.query_params.get("live") == "0":
            return JSONResponse([deployments.describe(d)
                                 for d in deployments.state.deployments()])
        return JSONResponse(await deployments.list_live())

    async def get_deployment(request: Request):
        d = deployments.get(request.path_params["name"])
        if request.query_params.get("detail") == "1":
            return JSONResponse(deployments.detail(d, await deployments.live(d["name"])))
        return JSONResponse(deployments.describe(d))

    async def run_deploy(body: dict, progress=None) -> dict:
        answer = await deployments.deploy(body, progress)
        if answer["changed"]:
            answer["pruned"] = rollouts.retain(answer["name"])
        return answer

    async def deploy(request: Request):
        body = await _body(request)
        if "application/x-ndjson" not in request.headers.get("accept", ""):
            return JSONResponse(await run_deploy(body))
        return StreamingResponse(_progress_lines(run_deploy, body),
                                 media_type="application/x-ndjson")

    async def rollback(request: Request):
        body = await _body(request)
        to = _version_field(body, "to")
        return JSONResponse(await rollouts.rollback(request.path_params["name"], to))

    async def undeploy(request: Request):
        return JSONResponse(await deployments.undeploy(request.path_params["name"]))

    async def versions(request: Request):
        name = request.path_params["name"]
        deployments.get(name)
        loaded = set((await deployments.live(name) or {}).get("loaded", []))
        return JSONResponse(deployments.version_rows(name, loaded))

    async def traffic(request: Request):
        body = await _body(request) if request.method == "POST" else {}
        return JSONResponse(await rollouts.traffic(request.path_params["name"],
                                                   body.get("split"), body.get("sticky_header")))

    async def promote(request: Request):
        number = _version_field(await _body(request), "version")
        return JSONResponse(await rollouts.promote(request.path_params["name"], number))

    async def label(request: Request):
        body = await _body(request)
        if not isinstance(body.get("label"), str):
            raise BadRequest("'label' must be a string")
        number = _version_field(body, "version")
        return JSONResponse(await rollouts.label(request.path_params["name"], body["label"],
                                                 number))

    async def copy_artifact(request: Request):
        body = await _body(request)
        if not isinstance(body.get("to"), str):
            raise BadRequest("'to' must be a folder path")
        name, number = request.path_params["name"], request.path_params["number"]
        return JSONResponse(await deployments.copy_artifact(name, number, body["to"]))

    async def prune(request: Request):
        return JSONResponse(rollouts.prune())

    async def events(request: Request):
        name = request.query_params.get("name")
        events = deployments.state.events(name, limit=200)
        if name and not events:
            deployments.get(name)  # raises NotFound for a name never deployed
        return JSONResponse(events)

    async def shutdown(request: Request):
        on_shutdown(keep_serving=bool((await _body(request)).get("keep_serving")))
        return JSONResponse({"stopping": True, "pid": os.getpid()})

    async def error(request: Request, exc: Exception):
        if isinstance(exc, MserveError):
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error in the daemon: {exc}"}, status_code=500)

    routes = [
        Route("/v1/status", status),
        Route("/v1/deployments", list_deployments),
        Route("/v1/deployments", deploy, methods=["POST"]),
        Route("/v1/deployments/{name}", get_deployment),
        Route("/v1/deployments/{name}", undeploy, methods=["DELETE"]),
        Route("/v1/deployments/{name}/rollback", rollback, methods=["POST"]),
        Route("/v1/deployments/{name}/versions", versions),
        Route("/v1/deployments/{name}/traffic", traffic, methods=["GET", "POST"]),
        Route("/v1/deployments/{name}/promote", promote, methods=["POST"]),
        Route("/v1/deployments/{name}/labels", label, methods=["POST"]),
        Route("/v1/deployments/{name}/versions/{number:int}/copy", copy_artifact,
              methods=["POST"]),
        Route("/v1/prune", prune, methods=["POST"]),
        Route("/v1/events", events),
        Route("/v1/shutdown", shutdown, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: error, MserveError: error})


async def _progress_lines(run, body: dict):
    """One JSON line per progress step, then {"result": ...} or {"error", "status"}."""
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(run(body, queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    while (step := await queue.get()) is not None:
        yield json.dumps({"progress": step}) + "\n"
    try:
        yield json.dumps({"result": task.result()}) + "\n"
    except MserveError as exc:
        yield json.dumps({**exc.to_dict(), "status": exc.status}) + "\n"
    except Exception as exc:
        log.exception("deploy failed")
        yield json.dumps({"error": f"internal error in the daemon: {exc}", "status": 500}) + "\n"


def _version_field(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"'{key}' must be a version number")
    return value


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body
