from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mserve.cli import autostart, tokens
from mserve.cli.render import BadUsage, JsonOption, emit_json, say
from mserve.cli.tokens import RequireTokenOption, TokenFileOption
from mserve.daemon.errors import MserveError
from mserve.daemon.paths import check_name
from mserve.daemon.worker.devices import DEVICE
from mserve.daemon.plan import (MAX_THREADS, THREADS_HELP, WORKERS_HELP, default_name,
                                parse_workers)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().absolute()) if path is not None else None


DEVICE_HELP = "auto (CUDA if usable, else the CPU), cpu, cuda or cuda:N (card N)."


def check_device(device: str | None) -> str | None:
    """``--device``: auto, cpu, cuda or cuda:N; bad usage (exit 2) otherwise."""
    if device is not None and DEVICE.fullmatch(device) is None:
        raise BadUsage(f"--device must be {DEVICE_HELP[:-1]}, got {device!r}")
    return device


class Batching(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


TransformerOption = Annotated[Optional[Path], typer.Option(
    help="A Python file with a Transformer class (preprocess/postprocess around the model; "
         "see docs/pipelines.md). It and the other files in its folder become part of the "
         "version. Trusted code: it runs in the worker.", show_default=False)]

BATCHING_HELP = ("auto: batch concurrent requests only when the version is proven batchable at "
                 "load (dim 0 is the batch and a joined run equals separate runs); on: batch "
                 "whenever every input has a dynamic dim 0; off: never.")


def deploy(
    path: Annotated[Path, typer.Argument(
        help="An .onnx file (its external-data files, e.g. model.onnx.data, are stored with "
             "it), or a folder holding model.onnx or exactly one *.onnx and its data files.",
        show_default=False)],
    name: Annotated[Optional[str], typer.Option(
        "--name", "-n", help="Deployment name (default: the file's stem).")] = None,
    transformer: TransformerOption = None,
    port: Annotated[Optional[int], typer.Option(
        min=1, max=65535, help="HTTP port for a new deployment (default: a free one).")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(
        min=1, max=65535, help="gRPC port for a new deployment (default: a free one).")] = None,
    host: Annotated[Optional[str], typer.Option(
        help="Address to bind (default 127.0.0.1).")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="auto|cpu|cuda[:N]",
                                                  help=DEVICE_HELP)] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Most rows per model run when batching concurrent requests (default 64; "
                    "1 turns batching off).")] = None,
    batch_delay_ms: Annotated[Optional[float], typer.Option(
        min=0, help="Wait this long for more requests to fill a batch (default 0: batches "
                    "form from what queued while the previous run ran).")] = None,
    batching: Annotated[Optional[Batching], typer.Option(help=BATCHING_HELP)] = None,
    canary: Annotated[Optional[int], typer.Option(
        min=1, max=99, help="Give the new version this percent of unpinned traffic and keep "
                            "the current version active (promote or roll back later).")] = None,
    allow_signature_change: Annotated[bool, typer.Option(
        "--allow-signature-change",
        help="Let a --canary whose inputs differ from the active version's take traffic.")
    ] = False,
    sticky_header: Annotated[Optional[str], typer.Option(
        help="Route each value of this header (e.g. X-User-ID) to one version of a split.")] = None,
    keep: Annotated[Optional[int], typer.Option(
        min=1, help="Versions whose artifacts stay on disk (default 5; active, canary, "
                    "standby and labelled ones are never pruned).")] = None,
    max_queue: Annotated[Optional[int], typer.Option(
        min=1, help="Requests allowed to wait; past it answers 503 (default 1024).")] = None,
    max_body_mb: Annotated[Optional[float], typer.Option(
        min=0.001, help="Largest request body in MiB; past it answers 413 (default 64).")] = None,
    instances: Annotated[Optional[int], typer.Option(
        min=1, max=64, help="ONNX Runtime sessions per version.")] = None,
    threads: Annotated[Optional[int], typer.Option(
        min=1, max=MAX_THREADS, help=THREADS_HELP)] = None,
    workers: Annotated[Optional[str], typer.Option(metavar="N|auto", help=WORKERS_HELP)] = None,
    token: RequireTokenOption = None,
    token_file: TokenFileOption = None,
    tls_cert: Annotated[Optional[Path], typer.Option(
        help="Serve HTTPS with this PEM certificate (first deploy only).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(
        help="The PEM private key of --tls-cert.")] = None,
    log_payloads: Annotated[Optional[bool], typer.Option(
        "--log-payloads/--no-log-payloads",
        help="Write request and response bodies into the request log (off by default).")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress display (it only shows on a terminal).")] = False,
    json_out: JsonOption = False,
) -> None:
    """Deploy a model, or a new version of a deployment, with no failed request.

    Example: mserve deploy examples/iris/model.onnx --name iris
    """
    if name is not None and (problem := check_name(name)):
        raise BadUsage(problem)
    if name is None and Path(path).exists() \
            and (problem := check_name(default_name(Path(path)))):
        # the name would come from the file's: a usage mistake as a bad --name is
        raise BadUsage(f"{problem} (taken from the file name '{Path(path).name}'); "
                       "choose one with --name")
    try:
        count = parse_workers(workers) if workers is not None else None
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    from_env = token is None and token_file is None and bool(os.environ.get(tokens.ENV))
    token = tokens.resolve(token, token_file)
    if from_env:
        # the same variable is predict's credential: say when a deploy takes it as its token
        sys.stderr.write(f"Note: the deployment's token is the one in {tokens.ENV}\n")
    if (tls_cert is None) != (tls_key is None):
        raise MserveError("--tls-cert and --tls-key go together")
    if host and host not in LOOPBACK and not token:
        sys.stderr.write(f"Warning: binding {host} without --token: anyone who can reach this "
                         "machine can use the model\n")
    request = {"path": str(path.expanduser().absolute()), "name": name, "port": port,
               "transformer": _absolute(transformer),
               "grpc_port": grpc_port, "canary": canary, "sticky_header": sticky_header,
               "keep": keep, "log_payloads": log_payloads,
               "host": host, "device": check_device(device),
               "max_batch_size": max_batch_size, "batch_delay_ms": batch_delay_ms,
               "max_queue": max_queue, "max_body_mb": max_body_mb, "instances": instances,
               "threads": threads, "workers": count,
               "batching": batching.value if batching else None,
               "allow_signature_change": allow_signature_change,
               "token": token, "tls_cert": _absolute(tls_cert), "tls_key": _absolute(tls_key)}
    client = autostart.client()
    if json_out or quiet or not sys.stdout.isatty():
        answer = client.deploy(request)
    else:
        answer = with_progress(client, request)
    if json_out:
        emit_json(answer)
        return
    d = answer["deployment"]
    if answer.get("options_changed") == ["canary"]:  # the canary's bytes again
        say(f"{answer['name']}: canary version {answer['version']} now takes {canary}% of "
            f"traffic ({d['url']})")
        return
    if answer["changed"] and answer.get("options_changed"):  # same bytes, other options
        say(f"{answer['name']} stays at version {answer['version']}; changed: "
            f"{', '.join(answer['options_changed'])} ({d['url']})")
        return
    if not answer["changed"]:
        which = "canary version" if answer["version"] != d.get("version") else "version"
        say(f"{answer['name']} is already at {which} {answer['version']} with identical "
            f"bytes; nothing changed ({d['url']})")
        return
    share = f" as a canary taking {canary}% of traffic" if canary else ""
    script = f" with transformer {answer['transformer']['script']}" \
        if answer.get("transformer") else ""
    say(f"Deployed {answer['name']} version {answer['version']}{script}{share} at {d['url']} "
        f"(device {d['device']})")
    if answer.get("signature_changed"):
        sys.stderr.write(f"Warning: the signature differs from version {answer['previous']}: "
                         f"{'; '.join(answer['signature_changed'])}\n")
    if answer.get("pruned"):
        say(f"Pruned the artifacts of versions {', '.join(map(str, answer['pruned']))}")


STEPS = {"copy": "Copying and hashing", "validate": "Validating in a child process",
         "load": "Loading and warming up", "switch": "Switching traffic"}


def with_progress(client, request: dict) -> dict:
    """Deploy while a Rich progress display shows each phase (bytes for the copy)."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("Starting", total=None)

        copied = {"done": 0, "total": None}

        def show(step: dict) -> None:
            if step["step"] == "copy":
                copied.update(done=step["done"], total=step["total"])
            progress.update(task, description=STEPS.get(step["step"], step["step"]),
                            completed=copied["done"], total=copied["total"])

        return client.stream("POST", "/v1/deployments", request, show)
