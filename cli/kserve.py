"""KServe manifests for one deployment: pure functions, dicts in and dicts out (no I/O).

``manifests`` gives a ``ServingRuntime`` that runs the mserve image (``mserve serve
/mnt/models``) and an ``InferenceService`` that uses it, or, with the ``triton`` runtime, an
``InferenceService`` on KServe's stock Triton runtime (the model is plain ONNX and the
protocol is the same). ``triton_config`` is the ``config.pbtxt`` of the Triton layout.

What each KServe deployment mode honours (read from KServe's controllers):
- Serverless (Knative): ``canaryTrafficPercent`` splits traffic between revisions; Knative
  routes one port per container, so the runtime declares HTTP only.
- Standard (``RawDeployment``): a Deployment and a Service; the Service gets a port per
  declared container port, so gRPC is declared as ``h2c``; ``canaryTrafficPercent`` is
  ignored, so a canary is refused rather than exported as a full rollout.
Metrics: KServe's pod mutator rewrites ``prometheus.io/port`` (to queue-proxy's 9091) when
``serving.kserve.io/enable-prometheus-scraping`` is true, cluster default included, so the
InferenceService sets it to "false" and carries the port /metrics really is on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mserve.daemon.errors import BadRequest

RUNTIME_API = "serving.kserve.io/v1alpha1"
ISVC_API = "serving.kserve.io/v1beta1"
HTTP_PORT, GRPC_PORT = 8080, 8081
TRITON_METRICS_PORT = 8002  # the stock runtime's prometheus.kserve.io/port
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the model
TRITON_RUNTIME = "kserve-tritonserver"  # KServe's stock ClusterServingRuntime
TRITON_MIN_MEMORY_MIB = 2048  # the stock runtime's request and limit (2Gi)
# On SIGTERM: still serving (not ready) for GRACE s while endpoints drop the pod, then a drain
# of up to DRAIN s: 25 s in all, under Kubernetes' default 30 s grace period.
GRACE_S, DRAIN_S = 5, 20
MAX_NAME = 45  # KServe derives longer names (NAME-predictor-00001...) that must fit in 63
MIB = 2**20
MODES = {"serverless": "Serverless", "standard": "RawDeployment"}  # deploymentMode values
# Options as `mserve serve` flags, with the value that needs no flag.
SERVE_FLAGS = (("device", "--device", "auto"), ("max_batch_size", "--max-batch-size", None),
               ("batch_delay_ms", "--batch-delay-ms", None), ("max_queue", "--max-queue", None),
               ("max_body_mb", "--max-body-mb", 64), ("instances", "--instances", 1),
               ("threads", "--threads", None))


@dataclass(frozen=True)
class Target:
    """Where and how the deployment should run on KServe."""

    image: str
    storage_uri: str
    runtime: str = "mserve"  # or "triton"
    namespace: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    mode: str = "serverless"  # or "standard"

    @property
    def grpc(self) -> bool:
        """Whether the runtime declares the gRPC port: Knative routes only one."""
        return self.mode == "standard"


def k8s_name(name: str) -> str:
    """A deployment name as a Kubernetes object name (DNS-1035 label: a-z, 0-9 and '-',
    starting with a letter, ending with a letter or digit)."""
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not text or not text[0].isalpha():
        text = f"m-{text}"
    return text[:MAX_NAME].rstrip("-")


def canary(traffic) -> tuple[int, int] | None:
    """(newer version, its percent) when a split gives weight to two versions or more, else
    None. ``traffic`` is the daemon's split (``[{"version": 1, "percent": 80}, ...]``, as
    ``GET /v1/deployments/NAME/traffic`` answers) or a mapping of version to percent (keys
    may be strings); anything else is None."""
    if isinstance(traffic, list):
        traffic = {row.get("version"): row.get("percent") for row in traffic
                   if isinstance(row, dict)}
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
    """Asked for CUDA (``cuda``, ``cuda:N``), or ``auto`` found it."""
    return str((deployment.get("options") or {}).get("device")).startswith("cuda") \
        or deployment.get("device") == "cuda"


def serve_args(name: str, options: dict) -> list[str]:
    """The deployment's options as ``mserve serve`` flags (defaults left out)."""
    args = ["--name", name]
    for key, flag, default in SERVE_FLAGS:
        value = options.get(key)
        if key == "device" and str(value).startswith("cuda:"):
            value = "cuda"  # a pod sees the one card it is given, as card 0
        if value is not None and value != default:
            args += [flag, _number(value)]
    return args


def resources(options: dict, gpu: bool, model_bytes: int, rss_bytes: int | None,
              triton: bool = False) -> dict:
    """Requests from what the deployment uses here: a core per session, memory from the
    worker's measured size (or from the model's size), a GPU when it runs on one.

    KServe merges these key by key into the runtime's own: Triton's stock runtime limits
    cpu to 1 and sets 2Gi, so for Triton every key is given (cpu limit = request, memory
    never below 2Gi) and the merged Pod stays valid."""
    instances = int(options.get("instances") or 1)
    guess = rss_bytes * 1.5 if rss_bytes else 256 * MIB + 3 * model_bytes * instances
    memory = max(256, -(-int(guess) // (64 * MIB)) * 64)  # MiB, rounded up to 64
    limit = memory * 2
    out = {"requests": {"cpu": str(instances)}, "limits": {}}
    if triton:
        memory, limit = max(memory, TRITON_MIN_MEMORY_MIB), max(limit, TRITON_MIN_MEMORY_MIB)
        out["limits"]["cpu"] = str(instances)
    out["requests"]["memory"] = f"{memory}Mi"
    out["limits"]["memory"] = f"{limit}Mi"
    if gpu:
        out["limits"]["nvidia.com/gpu"] = "1"
    return out


def runtime_name(image: str, grpc: bool) -> str:
    """One ServingRuntime per image (and port set), named from the image's name and tag
    plus a digest of the whole reference: exporting another image never re-images the
    InferenceServices that use this one."""
    ref, _, digest = image.partition("@")
    last = ref.rsplit("/", 1)[-1]
    base, _, tag = last.partition(":")
    tag = tag or (digest.partition(":")[2][:12] if digest else "latest")
    readable = re.sub(r"[^a-z0-9]+", "-", f"{base}-{tag}".lower()).strip("-")[:40]
    key = hashlib.sha256(f"{image}|{'grpc' if grpc else 'http'}".encode()).hexdigest()[:6]
    return f"{readable.rstrip('-') or 'mserve'}-{key}"


def serving_runtime(target: Target) -> dict:
    """A ServingRuntime running ``mserve serve /mnt/models`` (HTTP 8080, gRPC 8081)."""
    ports = [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    if target.grpc:  # KServe's Service names gRPC ports h2c (appProtocol kubernetes.io/h2c)
        ports.append({"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"})
    container = {
        "name": "kserve-container", "image": target.image,
        "command": ["mserve", "serve", MODEL_DIR],
        # {{.Name}}: the InferenceService's name, a default the InferenceService's own
        # --name (the deployment's name) overrides; KServe appends its args after these.
        "args": ["--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
                 "--name", "{{.Name}}"],
        "env": [{"name": "MSERVE_DRAIN_GRACE", "value": str(GRACE_S)},
                {"name": "MSERVE_DRAIN_TIMEOUT", "value": str(DRAIN_S)}],
        "ports": ports,
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                           "periodSeconds": 2, "failureThreshold": 3},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    return {
        "apiVersion": RUNTIME_API, "kind": "ServingRuntime",
        "metadata": _metadata(runtime_name(target.image, target.grpc), target.namespace),
        "spec": {
            "annotations": {"prometheus.kserve.io/path": "/metrics",
                            "prometheus.kserve.io/port": str(HTTP_PORT),
                            **scrape(HTTP_PORT)},
            "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"] if target.grpc else ["v2"],
            "containers": [container],
        },
    }


def scrape(port: int) -> dict:
    return {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
            "prometheus.io/port": str(port)}


def inference_service(deployment: dict, version: dict, target: Target,
                      rss_bytes: int | None = None, traffic=None) -> dict:
    """The InferenceService for ``version`` of ``deployment`` (``list --json`` objects);
    ``traffic`` is the daemon's split, which makes a canary of the newer version."""
    name, options = deployment["name"], deployment.get("options") or {}
    gpu, triton = uses_gpu(deployment), target.runtime == "triton"
    model = {"modelFormat": {"name": "onnx"}, "protocolVersion": "v2",
             "storageUri": target.storage_uri,
             "resources": resources(options, gpu, int(version.get("size") or 0), rss_bytes,
                                    triton)}
    if triton:
        model["runtime"] = TRITON_RUNTIME  # batching options go in config.pbtxt
        # merged into the stock runtime's securityContext, which has no seccompProfile
        model["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
    else:
        model["runtime"] = runtime_name(target.image, target.grpc)
        model["args"] = serve_args(name, options)
        if deployment.get("auth"):
            model["env"] = [{"name": "MSERVE_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": token_secret(name), "key": "token"}}}]
    predictor = {}
    if target.min_replicas is not None:
        predictor["minReplicas"] = target.min_replicas
    if target.max_replicas is not None:
        predictor["maxReplicas"] = target.max_replicas
    if (split := canary(traffic)) and split[0] == version["version"]:
        if target.mode != "serverless":
            raise BadRequest(
                f"version {split[0]} of '{name}' is a canary ({split[1]}%), and KServe's "
                "Standard mode ignores canaryTrafficPercent",
                hint="export it with --mode serverless, or export the stable version "
                     "(--version V) until the canary is promoted")
        predictor["canaryTrafficPercent"] = split[1]
    predictor["model"] = model
    metadata = _metadata(k8s_name(name), target.namespace)
    metadata["annotations"] = {
        "serving.kserve.io/deploymentMode": MODES[target.mode],
        # "false", not absent: a cluster default of true would move prometheus.io/port.
        "serving.kserve.io/enable-prometheus-scraping": "false",
        **(scrape(TRITON_METRICS_PORT) if triton else {}),
        "mserve/deployment": name, "mserve/model-version": str(version["version"]),
        "mserve/sha256": version.get("sha256") or ""}
    return {"apiVersion": ISVC_API, "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def manifests(deployment: dict, version: dict, target: Target,
              rss_bytes: int | None = None, traffic=None) -> list[dict]:
    """Every object to apply, in order: the ServingRuntime (mserve runtime only), then the
    InferenceService."""
    check(target)
    isvc = inference_service(deployment, version, target, rss_bytes, traffic)
    if target.runtime == "triton":
        return [isvc]
    return [serving_runtime(target), isvc]


def check(target: Target) -> None:
    if target.runtime not in ("mserve", "triton"):
        raise BadRequest(f"unknown runtime {target.runtime!r}: use mserve or triton")
    if target.mode not in MODES:
        raise BadRequest(f"unknown mode {target.mode!r}: use serverless or standard")
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
        out.append("Note: /metrics wants the token too; give Prometheus the bearer token, "
                   "or it is answered 401")
    if target.mode == "standard" and target.min_replicas == 0:
        out.append("Note: Standard mode does not scale to zero; KServe's autoscaler keeps "
                   "at least 1 pod (use --mode serverless to scale to zero)")
    if target.runtime == "mserve" and not has_registry(target.image):
        out.append(f"Warning: image {target.image!r} names no registry; the cluster pulls "
                   "it from Docker Hub (give --image REGISTRY/PATH:TAG)")
    return out


def has_registry(image: str) -> bool:
    """Whether an image reference starts with a registry host (``host.tld/``,
    ``host:port/`` or ``localhost/``), as Docker reads references."""
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


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
    if options.get("threads"):  # what Triton's ONNX Runtime backend reads for it
        lines.append('parameters { key: "intra_op_thread_count" value: { string_value: '
                     f'"{int(options["threads"])}" }} }}')
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
