"""``mserve export kserve``: the same deployment on KServe, as YAML to apply.

The manifests come from the pure builder in ``mserve.cli.kserve``; this command gathers
what it needs from the daemon, lays the model out with ``--artifact``, and writes YAML.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mserve.cli import autostart
from mserve.daemon.errors import BadRequest, MserveError, NotFound

app = typer.Typer(help="Write what another platform needs to run a deployment.",
                  no_args_is_help=True)


class Runtime(str, Enum):
    mserve = "mserve"
    triton = "triton"


class Mode(str, Enum):
    serverless = "serverless"
    standard = "standard"


@app.command("kserve")
def kserve(
    name: Annotated[str, typer.Argument(help="Deployment name.", show_default=False)],
    image: Annotated[Optional[str], typer.Option(
        help="The mserve image your cluster pulls, with its registry "
             "(REGISTRY/PATH:TAG; needed for --runtime mserve); see docs/kubernetes.md.",
        show_default=False)] = None,
    version_number: Annotated[Optional[int], typer.Option(
        "--version", min=1, help="The version to export (default: the canary during a "
                                 "canary, else the active version).")] = None,
    mode: Annotated[Mode, typer.Option(
        help="KServe's deployment mode: serverless (Knative: canaryTrafficPercent, HTTP "
             "only) or standard (RawDeployment: HTTP and gRPC, no canary).")] = Mode.serverless,
    storage_uri: Annotated[Optional[str], typer.Option(
        help="Where you upload the --artifact folder: s3://, gs://, pvc://, https://... "
             "(default pvc://mserve-models/NAME/vVERSION).")] = None,
    runtime: Annotated[Runtime, typer.Option(
        help="mserve: a ServingRuntime running the mserve image; triton: KServe's stock "
             "Triton runtime.")] = Runtime.mserve,
    min_replicas: Annotated[Optional[int], typer.Option(min=0, help="Fewest pods.")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(min=1, help="Most pods.")] = None,
    namespace: Annotated[Optional[str], typer.Option(
        help="Kubernetes namespace (default: kubectl's current one).")] = None,
    artifact: Annotated[Optional[Path], typer.Option(
        help="Also lay the model out in this new folder as KServe's storage initializer "
             "expects, ready to upload to --storage-uri.")] = None,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Write the YAML to this file ('-': stdout).")] = "-",
    json_out: Annotated[bool, typer.Option(
        "--json", help="Write a JSON Kubernetes List instead of YAML.")] = False,
) -> None:
    """Write KServe manifests (ServingRuntime + InferenceService) for a deployment.

    Carries over batching options, resources, the token's Secret and a canary split.

    Serverless mode exports a canary; Standard mode refuses one and declares gRPC.

    The token itself never appears in the output.

    Example: mserve export kserve iris --image registry.example.com/ml/mserve:0.1.0 -o i.yaml
    """
    from mserve.cli import kserve as ks
    from mserve.cli.render import BadUsage

    if runtime is Runtime.mserve and not image:
        raise BadUsage("--image is needed for the mserve runtime: the image in a registry "
                       "your cluster pulls from", hint="e.g. --image registry.example.com/"
                       "ml/mserve:0.1.0 (docs/kubernetes.md builds and pushes it)")
    client = autostart.client()
    d = client.deployment(name, detail=True)
    split = client.traffic(name).get("split")
    newest = ks.canary(split)
    number = version_number or (newest[0] if newest else d["version"])
    version = next((v for v in client.versions(name) if v["version"] == number), None)
    if version is None:
        raise NotFound(f"version {number} of '{name}' not found")
    target = ks.Target(
        image=image or "unused",
        storage_uri=storage_uri or f"pvc://mserve-models/{ks.k8s_name(name)}/v{number}",
        runtime=runtime.value, namespace=namespace, min_replicas=min_replicas,
        max_replicas=max_replicas, mode=mode.value)
    docs = ks.manifests(d, version, target, (d.get("live") or {}).get("rss_bytes"),
                        traffic=split)
    notes = ks.notes(d, target)
    if artifact is not None:
        lay_out(client, artifact, d, version, target)
        notes.append(f"Wrote the model to {artifact}/: upload its contents to "
                     f"{target.storage_uri}")
    text = _json(docs) if json_out else _yaml(docs, d, version, target)
    _write(text, output)
    for line in notes:
        print(line, file=sys.stderr if output == "-" else sys.stdout)


def lay_out(client, folder: Path, d: dict, version: dict, target) -> None:
    """Have the daemon copy the version's stored files into ``folder`` in the storage
    initializer's layout (the CLI never reads the store itself)."""
    from mserve.cli import kserve as ks

    folder = folder.expanduser().absolute()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BadRequest(f"'{folder}' exists and is not an empty folder; "
                         "choose a new one for --artifact")
    model_dir, config = ks.artifact_layout(target, d["name"])
    client.copy_artifact(d["name"], version["version"], str(folder / model_dir))
    if config:
        text = ks.triton_config(d["name"], d.get("options") or {}, bool(version["batchable"]))
        try:
            (folder / config).write_text(text)
        except OSError as exc:
            raise MserveError(f"cannot write '{folder}': {exc.strerror or exc}") from None


def _yaml(docs: list[dict], d: dict, version: dict, target) -> str:
    import yaml

    head = (f"# mserve export kserve {d['name']}: version {version['version']} "
            f"(sha256 {version['sha256'][:12]}), runtime {target.runtime}, "
            f"mode {target.mode}\n"
            f"# Apply with: kubectl apply -f FILE\n")
    return head + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def _json(docs: list[dict]) -> str:
    import json

    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=2) + "\n"


def _write(text: str, output: str) -> None:
    if output == "-":
        sys.stdout.write(text)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise MserveError(f"cannot write '{output}': {exc.strerror or exc}") from None
    print(f"Wrote {output}")
