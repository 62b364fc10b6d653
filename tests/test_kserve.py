"""KServe export: every manifest mserve writes is valid against KServe's own CRD schemas
(read from ../shared/kserve-crds/, never copied here), plus the builder's pieces, the
model layouts `mserve serve` accepts, and the image's requirements."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mserve.cli import kserve as ks
from mserve.cli.commands.serve import locate
from mserve.daemon.errors import BadRequest
from tests import models
from tests.conftest import CLI
from tests.test_e2e_kserve_apiserver import merged_pod, pod_problems, quantity

ROOT = Path(__file__).parent.parent
CRDS = ROOT.parent / "shared" / "kserve-crds"
CRD_FILES = {"ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
             "InferenceService": "serving.kserve.io_inferenceservices.yaml"}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUALIFIED = re.compile(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of that served CRD version."""
    if not CRDS.is_dir():
        pytest.skip(f"KServe CRDs not found at {CRDS} (the project's shared folder, "
                    "../shared/kserve-crds/ beside the repository)")
    yaml = pytest.importorskip("yaml")
    out = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.safe_load((CRDS / filename).read_text())
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def validate(doc: dict, schemas: dict) -> None:
    """What the API server would do: schema validation, no field it would silently prune,
    and object metadata it would accept."""
    import jsonschema

    schema = schemas[(doc["apiVersion"], doc["kind"])]
    jsonschema.Draft4Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == [], "fields Kubernetes would prune"
    meta = doc["metadata"]
    pattern = DNS_1035 if doc["kind"] == "InferenceService" else DNS_1123
    assert pattern.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    if "namespace" in meta:
        assert DNS_1035.fullmatch(meta["namespace"])
    for field in ("labels", "annotations"):
        for key, value in meta.get(field, {}).items():
            assert QUALIFIED.fullmatch(key) and isinstance(value, str), (field, key, value)
    for key, value in doc["spec"].get("annotations", {}).items():
        assert QUALIFIED.fullmatch(key) and isinstance(value, str), (key, value)


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths in ``value`` that a structural schema does not declare (Kubernetes drops them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return []  # e.g. metadata: type object, checked on its own
        out = []
        for key, item in value.items():
            if props is not None and key in props:
                out += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(item, extra, f"{path}.{key}")
            else:
                out.append(f"{path}.{key}")
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [p for i, item in enumerate(value)
                for p in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def deployment(**changes) -> dict:
    """A `mserve list --json` object, as the daemon describes one."""
    d = {"name": "recs_v2.x", "version": 2, "status": "ready", "device": "cpu",
         "options": {"device": "auto", "max_batch_size": 16, "batch_delay_ms": 2.5,
                     "max_queue": 256, "instances": 2, "max_body_mb": 8.0, "grpc_port": 40001},
         "auth": False}
    return {**d, **changes}


VERSION = {"version": 2, "sha256": "ab" * 32, "size": 5 * 2**20, "state": "active"}
TARGETS = {
    "mserve": ks.Target(image="registry.example.com/mserve:0.1.0",
                        storage_uri="s3://models/recs/v2"),
    "triton": ks.Target(image="unused", storage_uri="gs://models/recs/v2", runtime="triton"),
    "replicas": ks.Target(image="mserve:0.1.0", storage_uri="pvc://mserve-models/recs/v2",
                          namespace="ml-prod", min_replicas=0, max_replicas=5),
    "triton-replicas": ks.Target(image="unused", storage_uri="s3://m/recs", runtime="triton",
                                 namespace="ml", min_replicas=2, max_replicas=2),
    "standard": ks.Target(image="registry.example.com/mserve:0.1.0",
                          storage_uri="s3://models/recs/v2", mode="standard"),
    "triton-standard": ks.Target(image="unused", storage_uri="s3://m/recs", runtime="triton",
                                 mode="standard"),
}
# The daemon's split (GET /v1/deployments/NAME/traffic), version 2 a canary at 10%.
SPLIT = [{"version": 1, "percent": 90, "requests": 0}, {"version": 2, "percent": 10}]
DEPLOYMENTS = {
    "plain": deployment(),
    "token": deployment(auth=True),
    "canary": deployment(),
    "gpu": deployment(device="cuda", options={"device": "cuda", "instances": 1}),
    "defaults": deployment(name="iris", options={"device": "auto", "max_batch_size": None,
                                                 "batch_delay_ms": None, "max_queue": None,
                                                 "instances": 1, "max_body_mb": 64}),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", DEPLOYMENTS)
def test_every_manifest_is_valid_for_kserve(schemas, case, target):
    split = SPLIT if case == "canary" else None
    if split and TARGETS[target].mode == "standard":
        with pytest.raises(BadRequest, match="Standard mode ignores canaryTrafficPercent"):
            ks.manifests(DEPLOYMENTS[case], VERSION, TARGETS[target], traffic=split)
        return
    docs = ks.manifests(DEPLOYMENTS[case], VERSION, TARGETS[target], rss_bytes=90 * 2**20,
                        traffic=split)
    assert [d["kind"] for d in docs] == (["InferenceService"] if "triton" in target
                                         else ["ServingRuntime", "InferenceService"])
    for doc in docs:
        validate(doc, schemas)
    yaml = pytest.importorskip("yaml")
    text = yaml.safe_dump_all(docs)
    assert list(yaml.safe_load_all(text)) == docs
    # The Pod KServe would build: valid resources, Pod Security "restricted", and
    # prometheus.io/port where /metrics is.
    pod = merged_pod(docs[-1], None if "triton" in target else docs[0])
    assert pod_problems(pod) == []
    want = "8002" if "triton" in target else "8080"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == want


def _isvc(d: dict, target: str = "mserve", traffic=None) -> dict:
    return ks.manifests(d, VERSION, TARGETS[target], traffic=traffic)[-1]


def test_the_runtime_runs_mserve_serve():
    runtime = ks.manifests(deployment(), VERSION, TARGETS["mserve"])[0]
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]  # Serverless: Knative routes one port
    assert spec["supportedModelFormats"][0]["name"] == "onnx"
    (container,) = spec["containers"]
    assert container["image"] == "registry.example.com/mserve:0.1.0"
    assert container["command"] + container["args"] == [
        "mserve", "serve", "/mnt/models", "--port", "8080", "--grpc-port", "8081",
        "--name", "{{.Name}}"]
    assert [p["name"] for p in container["ports"]] == ["http1"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert spec["annotations"]["prometheus.io/port"] == "8080"


def test_standard_mode_declares_grpc_as_h2c():
    runtime, isvc = ks.manifests(deployment(), VERSION, TARGETS["standard"])
    ports = runtime["spec"]["containers"][0]["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [("http1", 8080), ("h2c", 8081)]
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == \
        "RawDeployment"
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    serverless = ks.manifests(deployment(), VERSION, TARGETS["mserve"])
    assert serverless[1]["metadata"]["annotations"][
        "serving.kserve.io/deploymentMode"] == "Serverless"
    assert serverless[0]["metadata"]["name"] != runtime["metadata"]["name"]


def test_one_serving_runtime_per_image():
    names = {image: ks.runtime_name(image, grpc=False) for image in (
        "registry.example.com/ml/mserve:0.1.0", "registry.example.com/ml/mserve:0.2.0",
        "other.example.com/ml/mserve:0.1.0", "registry.example.com/ml/mserve:0.1.0-gpu",
        "r.example.com/mserve@sha256:" + "ab" * 32, "localhost:5000/mserve")}
    assert len(set(names.values())) == len(names)
    assert names["registry.example.com/ml/mserve:0.1.0"].startswith("mserve-0-1-0-")
    assert names["localhost:5000/mserve"].startswith("mserve-latest-")
    for name in names.values():
        assert DNS_1123.fullmatch(name) and len(name) <= 63, name
    a = ks.Target(image="registry.example.com/ml/mserve:0.1.0", storage_uri="s3://x")
    b = ks.Target(image="registry.example.com/ml/mserve:0.2.0", storage_uri="s3://y")
    first, second = (ks.manifests(deployment(), VERSION, t) for t in (a, b))
    assert first[0]["metadata"]["name"] != second[0]["metadata"]["name"]
    assert first[1]["spec"]["predictor"]["model"]["runtime"] == first[0]["metadata"]["name"]


def test_the_pod_serves_the_model_under_its_name():
    runtime, isvc = ks.manifests(DEPLOYMENTS["defaults"], VERSION, TARGETS["mserve"])
    args = merged_pod(isvc, runtime)["spec"]["containers"][0]["args"]
    assert args == ["--port", "8080", "--grpc-port", "8081", "--name", "iris",
                    "--name", "iris"]  # the last --name wins: the deployment's own name


def test_metrics_annotations_survive_kserve_s_mutator():
    for target in ("mserve", "standard", "triton"):
        isvc = _isvc(deployment(), target)
        assert isvc["metadata"]["annotations"][
            "serving.kserve.io/enable-prometheus-scraping"] == "false"
    triton = merged_pod(_isvc(deployment(), "triton"))
    assert triton["metadata"]["annotations"]["prometheus.io/port"] == "8002"


@pytest.mark.parametrize("instances", [1, 2, 4])
def test_triton_with_instances_makes_a_valid_pod(instances):
    d = deployment(options={**deployment()["options"], "instances": instances})
    pod = merged_pod(_isvc(d, "triton"))
    assert pod_problems(pod) == []
    res = pod["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == str(instances)
    assert quantity(res["requests"]["memory"]) >= 2 * 2**30  # never below Triton's 2Gi
    assert quantity(res["limits"]["memory"]) >= 2 * 2**30


def test_the_inference_service_carries_the_deployment_over():
    isvc = _isvc(deployment())
    assert isvc["metadata"]["name"] == "recs-v2-x"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"].startswith("mserve-0-1-0-") and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/recs/v2"
    assert model["args"] == ["--name", "recs_v2.x", "--max-batch-size", "16",
                             "--batch-delay-ms", "2.5", "--max-queue", "256",
                             "--max-body-mb", "8", "--instances", "2"]
    assert model["resources"]["requests"]["cpu"] == "2"
    assert "env" not in model and "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["mserve/model-version"] == "2"
    assert _isvc(DEPLOYMENTS["defaults"])["spec"]["predictor"]["model"]["args"] == [
        "--name", "iris"]


def test_a_token_becomes_a_secret_reference_never_the_token():
    model = _isvc(deployment(auth=True, token_hash="f" * 64))["spec"]["predictor"]["model"]
    assert model["env"] == [{"name": "MSERVE_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "recs-v2-x-token", "key": "token"}}}]
    assert "f" * 64 not in json.dumps(model)
    assert any("recs-v2-x-token" in n for n in ks.notes(deployment(auth=True),
                                                        TARGETS["mserve"]))
    assert any("Triton does not check" in n for n in ks.notes(deployment(auth=True),
                                                              TARGETS["triton"]))


def test_replicas_namespace_and_gpu():
    isvc = _isvc(deployment(), "replicas")
    assert isvc["metadata"]["namespace"] == "ml-prod"
    assert (isvc["spec"]["predictor"]["minReplicas"],
            isvc["spec"]["predictor"]["maxReplicas"]) == (0, 5)
    docs = ks.manifests(DEPLOYMENTS["gpu"], VERSION, TARGETS["mserve"])
    model = docs[1]["spec"]["predictor"]["model"]
    assert model["runtime"] == docs[0]["metadata"]["name"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--device" in model["args"]
    with pytest.raises(BadRequest, match="above --max-replicas"):
        ks.manifests(deployment(), VERSION, ks.Target("i", "s3://x", min_replicas=3,
                                                      max_replicas=2))


def test_a_canary_split_becomes_canary_traffic_percent():
    isvc = _isvc(deployment(), traffic=SPLIT)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    triton = _isvc(deployment(), "triton", traffic={1: 75, 2: 25})
    assert triton["spec"]["predictor"]["canaryTrafficPercent"] == 25
    # The split names a newer version than the one exported: not this manifest's canary.
    assert "canaryTrafficPercent" not in _isvc(deployment(), traffic={"2": 90, "3": 10})[
        "spec"]["predictor"]
    # Standard mode would ignore it: refused, but the stable version exports.
    with pytest.raises(BadRequest, match="canary"):
        _isvc(deployment(), "standard", traffic=SPLIT)
    stable = ks.manifests(deployment(), {**VERSION, "version": 1}, TARGETS["standard"],
                          traffic=SPLIT)[-1]
    assert "canaryTrafficPercent" not in stable["spec"]["predictor"]


@pytest.mark.parametrize("image, registry", [
    ("registry.example.com/ml/mserve:0.1.0", True), ("localhost:5000/mserve", True),
    ("localhost/mserve:dev", True), ("mserve:0.1.0", False), ("ml/mserve:1", False),
])
def test_an_image_without_a_registry_is_warned_about(image, registry):
    assert ks.has_registry(image) is registry
    target = ks.Target(image=image, storage_uri="s3://x")
    assert any("names no registry" in n for n in ks.notes(deployment(), target)) is not registry


def test_notes_say_what_a_mode_or_a_token_does_not_do():
    standard = ks.Target(image="r.example/m:1", storage_uri="s3://x", mode="standard",
                         min_replicas=0)
    assert any("does not scale to zero" in n for n in ks.notes(deployment(), standard))
    assert any("/metrics wants the token" in n
               for n in ks.notes(deployment(auth=True), TARGETS["mserve"]))
    with pytest.raises(BadRequest, match="unknown mode"):
        ks.manifests(deployment(), VERSION, ks.Target("r.example/m:1", "s3://x", mode="raw"))


@pytest.mark.parametrize("traffic, expected", [
    ({"1": 90, "2": 10}, (2, 10)), ({3: 50, 4: 50.4}, (4, 50)), ({"1": 100}, None),
    ({"1": 100, "2": 0}, None), (None, None), ([1, 2], None), ({"x": 1, "2": "y"}, None),
    ({"1": 30, "2": 30, "5": 40}, (5, 40)),
    ([{"version": 1, "percent": 80}, {"version": 2, "percent": 20}], (2, 20)),
    ([{"version": 1, "percent": 100}], None), ([{"x": 1}, 3], None),
])
def test_canary_reads_a_split_defensively(traffic, expected):
    assert ks.canary(traffic) == expected


@pytest.mark.parametrize("name, expected", [
    ("iris", "iris"), ("recs_v2.x", "recs-v2-x"), ("2fast", "m-2fast"), ("a" * 63, "a" * 45),
    ("x--", "x"), ("__a", "a"),
])
def test_k8s_names(name, expected):
    assert ks.k8s_name(name) == expected and DNS_1035.fullmatch(ks.k8s_name(name))


def test_triton_config():
    options = {"max_batch_size": 8, "batch_delay_ms": 0.5, "max_queue": 100, "instances": 2}
    text = ks.triton_config("recs", options, batchable=True)
    assert text.splitlines() == [
        'name: "recs"', 'platform: "onnxruntime_onnx"', "max_batch_size: 8",
        ("dynamic_batching { max_queue_delay_microseconds: 500 "
         "default_queue_policy { max_queue_size: 100 } }"),
        "instance_group [ { count: 2 } ]"]
    assert ks.triton_config("r", {}, batchable=True).splitlines()[2:] == [
        "max_batch_size: 64", "dynamic_batching { }"]
    assert ks.triton_config("r", options, batchable=False).splitlines()[2] == "max_batch_size: 0"
    assert ks.artifact_layout(TARGETS["triton"], "recs") == ("recs/1", "recs/config.pbtxt")
    assert ks.artifact_layout(TARGETS["mserve"], "recs") == ("", None)


@pytest.mark.e2e
@pytest.mark.parametrize("runtime", ["mserve", "triton"])
def test_the_export_of_a_real_deployment_is_valid(schemas, shared, affine_v1, tmp_path, runtime):
    yaml = pytest.importorskip("yaml")
    shared.json("deploy", affine_v1, "--name", f"exp-{runtime}", "--max-batch-size", "4",
                "--token", "secret-token")
    out = shared.ok("export", "kserve", f"exp-{runtime}", "--runtime", runtime,
                    "--max-replicas", "3", "--namespace", "ml", "--image", "r.example/m:1")
    docs = list(yaml.safe_load_all(out.stdout))
    assert docs and all(d["metadata"]["namespace"] == "ml" for d in docs)
    for doc in docs:
        validate(doc, schemas)
    assert "secret-token" not in out.stdout + out.stderr
    as_json = shared.json("export", "kserve", f"exp-{runtime}", "--runtime", runtime,
                          "--max-replicas", "3", "--namespace", "ml", "--image", "r.example/m:1")
    assert as_json["kind"] == "List" and as_json["items"] == docs
    shared.ok("undeploy", f"exp-{runtime}")


# ---- layouts `mserve serve` accepts ------------------------------------------------------
def test_serve_finds_the_model_in_every_layout(tmp_path):
    single = models.affine(tmp_path / "a" / "anything.onnx")
    assert locate(single) == (single, 1, None)
    assert locate(single.parent) == (single, 1, None)
    plain = models.affine(tmp_path / "b" / "model.onnx")
    (tmp_path / "b" / "other.onnx").write_bytes(plain.read_bytes())
    assert locate(plain.parent) == (plain, 1, None)  # model.onnx wins over others
    models.affine(tmp_path / "c" / "1" / "model.onnx")
    newest = models.affine(tmp_path / "c" / "3" / "model.onnx")
    (tmp_path / "c" / "10").mkdir()  # an empty version folder is skipped
    assert locate(tmp_path / "c") == (newest, 3, None)
    repo = models.affine(tmp_path / "d" / "recs" / "1" / "model.onnx")
    (tmp_path / "d" / "recs" / "config.pbtxt").write_text('name: "recs"\n')
    assert locate(tmp_path / "d") == (repo, 1, "recs")


def test_serve_explains_a_folder_without_a_model(tmp_path):
    with pytest.raises(BadRequest, match="holds no model"):
        locate(tmp_path)
    with pytest.raises(BadRequest, match="does not exist"):
        locate(tmp_path / "nope")
    models.affine(tmp_path / "x.onnx")
    models.affine(tmp_path / "y.onnx")
    with pytest.raises(BadRequest, match="several .onnx files"):
        locate(tmp_path)


def test_serve_usage_errors_are_one_line(tmp_path):
    model = models.affine(tmp_path / "m.onnx")
    for args, words, code in ([[model, "--port", "9000", "--grpc-port", "9000"], "must differ",
                               1],
                              [[tmp_path / "none"], "does not exist", 1],
                              [[model, "--name", "Bad Name"], "invalid deployment name", 2]):
        result = subprocess.run(CLI + ["serve"] + [str(a) for a in args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == code and result.stderr.startswith("Error: "), result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr


# ---- the image -------------------------------------------------------------------------
def test_the_image_requirements_follow_pyproject():
    pytest.importorskip("tomllib")
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import requirements
    finally:
        sys.path.pop(0)
    cpu, gpu = requirements.requirements("cpu"), requirements.requirements("gpu")
    assert not any(r.startswith("onnxruntime-gpu") for r in cpu)
    assert "onnxruntime>=1.18" in cpu and any(r.startswith("pyyaml") for r in cpu)
    # The GPU image brings the CUDA and cuDNN libraries the wheel was built for as wheels.
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]>=") for r in gpu), gpu
    assert len(cpu) == len(gpu) - 1


def test_the_dockerfile_runs_mserve_serve_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mserve", "serve", "/mnt/models"]' in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0"))
    # Offline builds: no frontend image to fetch, and no stage chosen through an ARG
    # (Docker's classic builder and buildah 1.28 cannot resolve one).
    assert not re.search(r"^# *syntax=", text, re.MULTILINE)
    assert not re.search(r"^FROM \S*\$\{?VARIANT", text, re.MULTILINE)
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines and {"!pyproject.toml", "!cli/", "!daemon/", "!docker/"} <= set(lines)
