"""Every `mserve export kserve` a real daemon writes, and the Pod KServe would build from it,
passes a real kube-apiserver's server-side dry-run (../shared/tools/kube-apiserver, with
KServe's CRDs). Skipped, with the reason, where that tool or its built binaries are absent:
building them takes minutes, so it is never done here (`kube-apiserver build` does it once).

``merged_pod`` is the Pod KServe's predictor reconciler and pod mutator make from a runtime
and an InferenceService, as read in kserve/kserve (``MergeRuntimeContainers``: a strategic
merge of the runtime's container with the predictor's model, args appended; placeholders
such as ``{{.Name}}`` filled from the InferenceService; annotations runtime < InferenceService;
the storage initializer; the metrics mutator's rewrite of ``prometheus.io/port``)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import models

ROOT = Path(__file__).parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "kube-apiserver"
WORK = Path(os.environ.get("MSERVE_TOOLS_HOME", "/tmp/mserve-tools")) / "kube"
IMAGE = "registry.example.com/ml/mserve:0.1.0"
# KServe's stock ClusterServingRuntime for Triton (config/runtimes/kserve-tritonserver.yaml),
# its container as a cluster has it once KServe's kustomization names the image.
TRITON_CONTAINER = {
    "name": "kserve-container", "image": "nvcr.io/nvidia/tritonserver:23.05-py3",
    "args": ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000",
             "--http-port=8080", "--allow-grpc=true", "--allow-http=true"],
    "securityContext": {"runAsUser": 1000, "allowPrivilegeEscalation": False,
                        "privileged": False, "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]}},
    "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                  "limits": {"cpu": "1", "memory": "2Gi"}},
}
TRITON_ANNOTATIONS = {"prometheus.kserve.io/port": "8002", "prometheus.kserve.io/path": "/metrics"}
MODEL_ONLY = ("modelFormat", "runtime", "runtimeVersion", "storageUri", "protocolVersion",
              "storage")
MERGE_KEYS = {"env": "name", "ports": "containerPort", "volumeMounts": "mountPath"}
MOUNT = "kserve-provision-location"


# ---- the Pod KServe builds ---------------------------------------------------------------
def _merge(base, patch, key: str | None = None):
    """A strategic merge patch as Kubernetes applies one to a Container: maps recursively,
    lists of named items by their merge key, any other list replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field, out = MERGE_KEYS[key], [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(out) if old.get(field) == item.get(field)),
                      None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _placeholders(value, meta: dict):
    """``{{.Name}}``, ``{{.Namespace}}``, ``{{.Labels.x}}``, ``{{.Annotations.x}}``."""
    if isinstance(value, dict):
        return {k: _placeholders(v, meta) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, meta) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match):
        field, _, key = match.group(1).partition(".")
        got = meta.get(field.lower())
        return str(got.get(key, "") if isinstance(got, dict) else got or "")
    return re.sub(r"\{\{\s*\.(\w+(?:\.[\w./-]+)?)\s*\}\}", fill, value)


def merged_pod(isvc: dict, runtime: dict | None = None) -> dict:
    """The predictor Pod for ``isvc`` on ``runtime`` (None: KServe's stock Triton runtime)."""
    spec = runtime["spec"] if runtime else {"containers": [TRITON_CONTAINER],
                                            "annotations": TRITON_ANNOTATIONS}
    predictor, meta = isvc["spec"]["predictor"], isvc["metadata"]
    model = {k: v for k, v in predictor["model"].items() if k not in MODEL_ONLY}
    (base,) = [c for c in spec["containers"] if c["name"] == "kserve-container"]
    container = _merge(base, {"name": "kserve-container", **model})
    container["args"] = base.get("args", []) + model.get("args", [])
    container = _placeholders(container, meta)
    container["volumeMounts"] = container.get("volumeMounts", []) + [
        {"name": MOUNT, "mountPath": "/mnt/models", "readOnly": True}]
    annotations = {**spec.get("annotations", {}), **meta.get("annotations", {})}
    if annotations.get("serving.kserve.io/enable-prometheus-scraping") == "true":
        annotations["prometheus.io/port"] = "9091"  # the mutator's rewrite
        annotations["prometheus.io/path"] = "/metrics"
    init = {"name": "storage-initializer", "image": "kserve/storage-initializer:v0.15.0",
            "args": [predictor["model"]["storageUri"], "/mnt/models"],
            "volumeMounts": [{"name": MOUNT, "mountPath": "/mnt/models"}]}
    name = f"{meta['name']}-predictor-00001-deployment-5d8f7c9b6-x2x7q"
    pod_meta = {"name": name, "annotations": annotations,
                "labels": {**meta.get("labels", {}),
                           "serving.kserve.io/inferenceservice": meta["name"],
                           "component": "predictor"}}
    if "namespace" in meta:
        pod_meta["namespace"] = meta["namespace"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta,
            "spec": {"initContainers": [init], "containers": [container],
                     "volumes": [{"name": MOUNT, "emptyDir": {}}]}}


def quantity(text: str) -> float:
    """A Kubernetes quantity ('500m', '2', '512Mi', '2Gi') as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3,
             "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def pod_problems(pod: dict) -> list[str]:
    """What the API server (requests <= limits) and Pod Security "restricted" refuse, and
    a prometheus.io/port that is not where /metrics is."""
    out = []
    for c in pod["spec"]["containers"]:
        res = c.get("resources", {})
        for key, limit in res.get("limits", {}).items():
            request = res.get("requests", {}).get(key)
            if request is not None and quantity(request) > quantity(limit):
                out.append(f"{c['name']}: {key} request {request} > limit {limit}")
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or not sc.get("runAsNonRoot"):
            out.append(f"{c['name']}: may escalate or run as root")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            out.append(f"{c['name']}: capabilities not dropped")
        if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: no seccompProfile (restricted wants RuntimeDefault)")
    return out


# ---- the API server ----------------------------------------------------------------------
def _tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def apiserver():
    """The tool's API server: used when already up, else started (~8 s) and stopped after."""
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} not found (the project's shared tools, beside the repository)")
    built = all((WORK / "bin" / b).is_file() for b in ("kube-apiserver", "kubectl"))
    if not built:
        pytest.skip(f"kube-apiserver is not built under {WORK}/bin: run "
                    f"'{TOOL} build' once (about 4 minutes, as root)")
    if os.geteuid() != 0 or not shutil.which("etcd"):
        pytest.skip("the kube-apiserver tool needs root and etcd (installed by its build)")
    started = _tool("status", timeout=30).returncode != 0
    if started:
        up = _tool("up")
        if up.returncode != 0:
            pytest.skip(f"kube-apiserver up failed: {(up.stderr or up.stdout).strip()[-300:]}")
    yield
    if started:
        _tool("down", timeout=60)


@pytest.fixture(scope="module")
def daemon(shared, model_dir):
    """Deployments to export: plain, with a token, with two instances, and a canary."""
    v1 = models.affine(model_dir / "ka1" / "m.onnx", scale=1.0)
    v2 = models.affine(model_dir / "ka2" / "m.onnx", scale=2.0)
    shared.json("deploy", v1, "--name", "kplain", "--max-batch-size", "8")
    shared.json("deploy", v1, "--name", "ktoken", "--token", "s3cret-t0ken")
    shared.json("deploy", v1, "--name", "kinst", "--instances", "2")
    shared.json("deploy", v1, "--name", "kcan")
    shared.json("deploy", v2, "--name", "kcan", "--canary", "20")
    yield shared
    for name in ("kplain", "ktoken", "kinst", "kcan"):
        shared.run("undeploy", name)


EXPORTS = {
    "plain": ("kplain",),
    "triton-instances": ("kinst", "--runtime", "triton"),
    "mserve-instances": ("kinst",),
    "canary": ("kcan", "--mode", "serverless"),
    "canary-triton": ("kcan", "--runtime", "triton"),
    "token": ("ktoken",),
    "grpc": ("kplain", "--mode", "standard", "--min-replicas", "1", "--max-replicas", "3"),
}


def dry_run(path: Path) -> None:
    result = _tool("dry-run", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run" in result.stdout, result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("case", EXPORTS)
def test_every_export_and_its_pod_pass_a_server_side_dry_run(apiserver, daemon, tmp_path,
                                                             case):
    yaml = pytest.importorskip("yaml")
    args = (*EXPORTS[case], "--image", IMAGE, "--namespace", "ml", "--storage-uri",
            "s3://models/k/v1")
    out = daemon.ok("export", "kserve", *args, "-o", str(tmp_path / "export.yaml"))
    assert "s3cret" not in out.stdout + out.stderr
    docs = list(yaml.safe_load_all((tmp_path / "export.yaml").read_text()))
    dry_run(tmp_path / "export.yaml")
    runtime = next((d for d in docs if d["kind"] == "ServingRuntime"), None)
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    if case.startswith("canary"):
        assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20
    pod = merged_pod(isvc, runtime)
    assert pod_problems(pod) == []
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod, sort_keys=False))
    dry_run(tmp_path / "pod.yaml")
