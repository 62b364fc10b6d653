"""KServe manifests for one deployment: pure functions, dicts in and dicts out (no I/O).

``manifests`` gives a ``ServingRuntime`` that runs the mserve image (``mserve serve
/mnt/models``) and an ``InferenceService`` that uses it, or, with the ``triton`` runtime, an
``InferenceService`` on KServe's stock Triton runtime (the model is plain ONNX and the
protocol is the same). ``triton_config`` is the ``config.pbtxt`` of the Triton layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mserve.daemon.errors import BadRequest

RUNTIME_API = "serving.kserve.io/v1alpha1"
ISVC_API = "serving.kserve.io/v1beta1"
HTTP_PORT, GRPC_PORT = 8080, 8081
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the model
TRITON_RUNTIME = "kserve-tritonserver"  # KServe's stock ClusterServingRuntime
DRAIN_S = 25  # under Kubernetes' default 30 s grace period, so the drain finishes
MAX_NAME = 45  # KServe derives longer names (NAME-predictor-00001...) that must fit in 63
MIB = 2**20
# Options as `mserve serve` flags, with the value that needs no flag.
SERVE_FLAGS = (("device", "--device", "auto"), ("max_batch_size", "--max-batch-size", None),
               ("batch_delay_ms", "--batch-delay-ms", None), ("max_queue", "--max-queue", None),
               ("max_body_mb", "--max-body-mb", 64), ("instances", "--instances", 1))


@dataclass(frozen=True)
class Target:
    """Where and how the deployment should run on KServe."""

    image: str
    storage_uri: str
    runtime: str = "mserve"  # or "triton"
    namespace: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None


def k8s_name(name: str) -> str:
    """A deployment name as a Kubernetes object name (DNS-1035 label: a-z, 0-9 and '-',
    starting with a letter, ending with a letter or digit)."""
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not text or not text[0].isalpha():
        text = f"m-{text}"
    return text[:MAX_NAME].rstrip("-")


def canary(traffic) -> tuple[int, int] | None:
    """(newer version, its percent) when a split gives weight to two versions or more, else
    None. ``traffic`` maps version to percent (keys may be strings); anything else is None."""
    if not isinstance(traffic, dict):
        return None
    weights = {}
    for version, percent in traffic.items():
        try:
            number, share = int(version), float(percent)
        except (TypeError, ValueError):
            continue
        if share > 0:
            weights[number] = share
    if len(weights) < 2:
        return None
    newest = max(weights)
    return newest, max(0, min(100, round(weights[newest])))


def uses_gpu(deployment: dict) -> bool:
    return (deployment.get("options") or {}).get("device") == "cuda" \
        or deployment.get("device") == "cuda"


def serve_args(name: str, options: dict) -> list[str]:
    """The deployment's options as ``mserve serve`` flags (defaults left out)."""
    args = ["--name", name]
    for key, flag, default in SERVE_FLAGS:
        value = options.get(key)
        if value is not None and value != default:
            args += [flag, _number(value)]
    return args


def resources(options: dict, gpu: bool, model_bytes: int, rss_bytes: int | None) -> dict:
    """Requests from what the deployment uses here: a core per session, memory from the
    worker's measured size (or from the model's size), a GPU when it runs on one."""
    instances = int(options.get("instances") or 1)
    guess = rss_bytes * 1.5 if rss_bytes else 256 * MIB + 3 * model_bytes * instances
    memory = max(256, -(-int(guess) // (64 * MIB)) * 64)  # MiB, rounded up to 64
    out = {"requests": {"cpu": str(instances), "memory": f"{memory}Mi"},
           "limits": {"memory": f"{memory * 2}Mi"}}
    if gpu:
        out["limits"]["nvidia.com/gpu"] = "1"
    return out


def runtime_name(gpu: bool) -> str:
    return "mserve-gpu" if gpu else "mserve"


def serving_runtime(target: Target, gpu: bool) -> dict:
    """A ServingRuntime running ``mserve serve /mnt/models`` (HTTP 8080, gRPC 8081)."""
    metrics = {"path": "/metrics", "port": str(HTTP_PORT)}
    container = {
        "name": "kserve-container", "image": target.image,
        "command": ["mserve", "serve", MODEL_DIR],
        "args": ["--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)],
        "env": [{"name": "MSERVE_DRAIN_TIMEOUT", "value": str(DRAIN_S)}],
        # Knative routes one port; gRPC (8081) is reachable in raw deployment mode.
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                           "periodSeconds": 2, "failureThreshold": 3},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": RUNTIME_API, "kind": "ServingRuntime",
        "metadata": _metadata(runtime_name(gpu), target.namespace),
        "spec": {
            "annotations": {"prometheus.kserve.io/path": metrics["path"],
                            "prometheus.kserve.io/port": metrics["port"],
                            "prometheus.io/scrape": "true",
                            "prometheus.io/path": metrics["path"],
                            "prometheus.io/port": metrics["port"]},
            "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [container],
        },
    }


def inference_service(deployment: dict, version: dict, target: Target,
                      rss_bytes: int | None = None) -> dict:
    """The InferenceService for ``version`` of ``deployment`` (``list --json`` objects)."""
    name, options = deployment["name"], deployment.get("options") or {}
    gpu = uses_gpu(deployment)
    model = {"modelFormat": {"name": "onnx"}, "protocolVersion": "v2",
             "storageUri": target.storage_uri,
             "resources": resources(options, gpu, int(version.get("size") or 0), rss_bytes)}
    if target.runtime == "triton":
        model["runtime"] = TRITON_RUNTIME  # batching options go in config.pbtxt
    else:
        model["runtime"] = runtime_name(gpu)
        model["args"] = serve_args(name, options)
        if deployment.get("auth"):
            model["env"] = [{"name": "MSERVE_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": token_secret(name), "key": "token"}}}]
    predictor = {}
    if target.min_replicas is not None:
        predictor["minReplicas"] = target.min_replicas
    if target.max_replicas is not None:
        predictor["maxReplicas"] = target.max_replicas
    if (split := canary(deployment.get("traffic"))) and split[0] == version["version"]:
        predictor["canaryTrafficPercent"] = split[1]
    predictor["model"] = model
    metadata = _metadata(k8s_name(name), target.namespace)
    metadata["annotations"] = {"serving.kserve.io/enable-prometheus-scraping": "true",
                               "mserve/deployment": name,
                               "mserve/model-version": str(version["version"]),
                               "mserve/sha256": version.get("sha256") or ""}
    return {"apiVersion": ISVC_API, "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def manifests(deployment: dict, version: dict, target: Target,
              rss_bytes: int | None = None) -> list[dict]:
    """Every object to apply, in order: the ServingRuntime (mserve runtime only), then the
    InferenceService."""
    check(target)
    isvc = inference_service(deployment, version, target, rss_bytes)
    if target.runtime == "triton":
        return [isvc]
    return [serving_runtime(target, uses_gpu(deployment)), isvc]


def check(target: Target) -> None:
    if target.runtime not in ("mserve", "triton"):
        raise BadRequest(f"unknown runtime {target.runtime!r}: use mserve or triton")
    low, high = target.min_replicas, target.max_replicas
    if low is not None and high is not None and low > high:
        raise BadRequest(f"--min-replicas ({low}) is above --max-replicas ({high})")
    if high is not None and high < 1:
        raise BadRequest("--max-replicas must be at least 1")


def token_secret(name: str) -> str:
    """The Secret (key ``token``) the InferenceService reads the bearer token from."""
    return f"{k8s_name(name)}-token"


def notes(deployment: dict, target: Target) -> list[str]:
    """What the user must do or know beyond applying the manifests."""
    out = []
    if deployment.get("auth") and target.runtime == "triton":
        out.append("Warning: Triton does not check bearer tokens; this InferenceService "
                   "answers anyone who reaches it (use --runtime mserve, or KServe's auth)")
    elif deployment.get("auth"):
        out.append(f"The deployment needs a token: create the Secret first, e.g. kubectl "
                   f"create secret generic {token_secret(deployment['name'])} "
                   "--from-literal=token=...")
    return out


def artifact_layout(target: Target, name: str) -> tuple[str, str | None]:
    """(folder of the model files, path of config.pbtxt or None), relative to the folder
    uploaded to the storage URI: ``model.onnx`` at the top for mserve, a Triton model
    repository (``NAME/config.pbtxt``, ``NAME/1/model.onnx``) for triton."""
    if target.runtime == "triton":
        return f"{name}/1", f"{name}/config.pbtxt"
    return "", None


def triton_config(name: str, options: dict, batchable: bool) -> str:
    """A minimal config.pbtxt carrying the deployment's batching options."""
    size = int(options.get("max_batch_size") or 64) if batchable else 0
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {size}"]
    if size > 1:
        batching = []
        if options.get("batch_delay_ms"):
            batching.append("max_queue_delay_microseconds: "
                            f"{round(float(options['batch_delay_ms']) * 1000)}")
        if options.get("max_queue"):
            batching.append("default_queue_policy { max_queue_size: "
                            f"{int(options['max_queue'])} }}")
        lines.append("dynamic_batching { " + "".join(f"{b} " for b in batching) + "}")
    if int(options.get("instances") or 1) > 1:
        lines.append(f"instance_group [ {{ count: {int(options['instances'])} }} ]")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    """2.0 as '2', 0.5 as '0.5': what a user would type."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _metadata(name: str, namespace: str | None) -> dict:
    metadata = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/managed-by": "mserve"}
    return metadata
