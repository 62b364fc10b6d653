"""``mserve serve``: one model in the foreground, no daemon and no state: the container
entrypoint (KServe mounts the model at /mnt/models).

The command finds the model, builds a worker config and runs the worker in this process in
its standalone mode; the worker is imported only here, never at CLI start-up.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mserve.cli import tokens
from mserve.cli.commands.deploy import (BATCHING_HELP, DEVICE_HELP, LOOPBACK, Batching,
                                        TransformerOption, check_device)
from mserve.cli.render import BadUsage
from mserve.cli.tokens import RequireTokenOption, TokenFileOption
from mserve.daemon import envnumbers
from mserve.daemon.errors import BadRequest
from mserve.daemon.paths import check_name
from mserve.daemon.plan import MAX_THREADS, THREADS_HELP, hash_token, parse_workers
from mserve.daemon.store import MODEL_FILE, model_in
from mserve.daemon.workergroup import worker_count


def serve(
    path: Annotated[Path, typer.Argument(
        help="An .onnx file, or a folder holding model.onnx, exactly one *.onnx file, or "
             "version folders (1/model.onnx, as KServe lays out /mnt/models).",
        show_default=False)],
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8080,
    grpc_port: Annotated[int, typer.Option(
        min=0, max=65535, help="gRPC port (0: no gRPC).")] = 8081,
    host: Annotated[str, typer.Option(
        help="Address to bind. 0.0.0.0 by default, since this is the container entrypoint; "
             "use 127.0.0.1 to keep it on this machine.")] = "0.0.0.0",
    name: Annotated[Optional[str], typer.Option(
        "--name", "-n", help="Model name in the protocol's paths (default: the file's stem, "
                             "or the folder's name).")] = None,
    transformer: TransformerOption = None,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda[:N]",
                                        help=DEVICE_HELP)] = "auto",
    max_batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Most rows per model run when batching concurrent requests (default 64; "
                    "1 turns batching off).")] = None,
    batch_delay_ms: Annotated[Optional[float], typer.Option(
        min=0, help="Wait this long for more requests to fill a batch (default 0).")] = None,
    batching: Annotated[Batching, typer.Option(help=BATCHING_HELP)] = Batching.auto,
    max_queue: Annotated[Optional[int], typer.Option(
        min=1, help="Requests allowed to wait; past it answers 503 (default 1024).")] = None,
    max_body_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest request body in MiB; past it answers 413.")] = 64,
    instances: Annotated[int, typer.Option(
        min=1, max=64, help="ONNX Runtime sessions.")] = 1,
    threads: Annotated[Optional[int], typer.Option(
        min=1, max=MAX_THREADS, help=THREADS_HELP)] = None,
    workers: Annotated[str, typer.Option(
        metavar="N|auto", help="Worker processes sharing the ports (default 1; auto: one per "
                               "core), each with its own sessions and batcher.")] = "1",
    token: RequireTokenOption = None,
    token_file: TokenFileOption = None,
    tls_cert: Annotated[Optional[Path], typer.Option(
        help="Serve HTTPS with this PEM certificate.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(
        help="The PEM private key of --tls-cert.")] = None,
    drain_grace: Annotated[float, typer.Option(
        min=0, envvar="MSERVE_DRAIN_GRACE",
        help="On SIGTERM, answer not ready at once but go on serving this long, so that "
             "load balancers (a Service's endpoints) stop sending first; then drain. "
             "0: drain at once.")] = 5.0,
) -> None:
    """Serve one model in the foreground, without the daemon (the container entrypoint).

    Ready (GET /v2/health/ready) only once the model is loaded and warmed up.

    SIGTERM turns readiness off (HTTP and gRPC health; live stays 200) and keeps serving
    for --drain-grace seconds; then the ports close and in-flight requests get up to
    MSERVE_DRAIN_TIMEOUT s (30) to finish; exit 0. Ctrl-C, or a second SIGTERM, skips the grace.

    Example: mserve serve /mnt/models --port 8080 --name iris
    """
    if name is not None and (problem := check_name(name.lower())):
        raise BadUsage(problem)  # bad usage: exit 2
    try:
        count = worker_count(parse_workers(workers))
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    token = tokens.resolve(token, token_file)
    model, number, hint = locate(path.expanduser())
    name = (name or hint or default_name(path.expanduser())).lower()
    if problem := check_name(name):
        raise BadRequest(f"{problem} (pass --name)")
    if port == grpc_port:
        raise BadRequest(f"--port and --grpc-port must differ (both {port})")
    if (tls_cert is None) != (tls_key is None):
        raise BadRequest("--tls-cert and --tls-key go together")
    if host not in LOOPBACK and not token:
        sys.stderr.write(f"Warning: serving on {host} without --token: anyone who can reach "
                         "this port can use the model\n")
    options = {"device": check_device(device), "max_batch_size": max_batch_size,
               "batch_delay_ms": batch_delay_ms, "max_queue": max_queue,
               "max_body_mb": max_body_mb, "instances": instances, "threads": threads,
               "batching": batching.value, "grpc_port": grpc_port or None}
    if tls_cert is not None:
        options["tls"] = {"cert": str(tls_cert.absolute()), "key": str(tls_key.absolute())}
    config = {"name": name, "host": host, "port": port, "standalone": True,
              "token_hash": hash_token(token),
              "options": options, "bind_retry_s": 0,
              "drain_s": envnumbers.drain_timeout(),
              "drain_grace_s": drain_grace,
              "versions": [{"number": number, "path": str(model.absolute()), "active": True,
                            "transformer": _script(transformer)}]}
    if count > 1:
        from mserve.daemon.worker.fleet import serve_many

        if serve_many(config, count) != 0:
            raise typer.Exit(1)  # the reason is printed
        return
    # Until the worker installs its own handlers, SIGTERM stops a long load at once (a
    # container's PID 1 would otherwise ignore it).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from mserve.daemon.worker import main as worker

    if worker.main(["mserve serve", json.dumps(config)]) != 0:
        raise typer.Exit(1)  # the worker printed the reason


def _script(transformer: Path | None) -> str | None:
    """The transformer script, run where it is (``serve`` keeps no store)."""
    if transformer is None:
        return None
    from mserve.daemon.pipelinefiles import check_script

    script = transformer.expanduser().absolute()
    check_script(script)
    return str(script)


def locate(path: Path) -> tuple[Path, int, str | None]:
    """The model file under ``path``, its version number and a name hint:
    a file; a folder with model.onnx or exactly one *.onnx (``store.model_in``, the rule
    ``deploy`` uses too); version folders (``1/model.onnx``, the newest wins); or a
    Triton-style repository holding one model (``NAME/1/model.onnx``).
    """
    if path.is_file():
        return path, 1, None
    if not path.is_dir():
        raise BadRequest(f"model path '{path}' does not exist")
    if (model := model_in(path)) is not None:
        return model, 1, None
    if (newest := _newest_version(path)) is not None:
        return (*newest, None)
    folders = [d for d in _subfolders(path) if not d.name.isdigit()]
    if len(folders) == 1 and (newest := _newest_version(folders[0])) is not None:
        return (*newest, folders[0].name)
    raise BadRequest(f"folder '{path}' holds no model: expected {MODEL_FILE}, one .onnx file, "
                     f"or a version folder such as 1/{MODEL_FILE}")


def _newest_version(folder: Path) -> tuple[Path, int] | None:
    for version in sorted((d for d in _subfolders(folder) if d.name.isdigit()),
                          key=lambda d: int(d.name), reverse=True):
        if (model := model_in(version)) is not None:
            return model, int(version.name)
    return None


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError as exc:
        raise BadRequest(f"cannot read '{folder}': {exc.strerror}") from None


def default_name(path: Path) -> str:
    """As ``deploy`` names things: a file's stem, a folder's name."""
    return path.stem if path.is_file() else path.absolute().name
