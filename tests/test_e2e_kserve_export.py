"""`mserve export kserve` against a real daemon: what the daemon really reports (a canary's
split, its versions, its gRPC port) must reach the manifests, not what a hand-made dict says."""

from __future__ import annotations

import pytest

from tests import models

pytestmark = pytest.mark.e2e
IMAGE = "registry.example.com/ml/mserve:0.1.0"


@pytest.fixture(scope="module")
def canary(shared, model_dir):
    """'kcanary': version 1 stable at 80%, version 2 a canary at 20%."""
    v1 = models.affine(model_dir / "kc1" / "m.onnx", scale=1.0)
    v2 = models.affine(model_dir / "kc2" / "m.onnx", scale=2.0)
    shared.json("deploy", v1, "--name", "kcanary")
    shared.json("deploy", v2, "--name", "kcanary", "--canary", "20")
    yield "kcanary"
    shared.ok("undeploy", "kcanary")


def export(shared, *args: str) -> list[dict]:
    out = shared.json("export", "kserve", *args, "--image", IMAGE)
    assert out["kind"] == "List"
    return out["items"]


def predictor(docs: list[dict]) -> dict:
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    return isvc["spec"]["predictor"]


def test_a_canary_exports_the_new_version_with_its_share(shared, canary):
    docs = export(shared, canary)
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    assert isvc["metadata"]["annotations"]["mserve/model-version"] == "2"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("/kcanary/v2")


def test_a_changed_split_changes_the_export(shared, canary):
    shared.json("traffic", canary, "1=65", "2=35")
    try:
        assert predictor(export(shared, canary))["canaryTrafficPercent"] == 35
    finally:
        shared.json("traffic", canary, "1=80", "2=20")


def test_the_stable_version_exports_without_a_canary(shared, canary):
    stable = predictor(export(shared, canary, "--version", "1"))
    assert "canaryTrafficPercent" not in stable
    assert stable["model"]["storageUri"].endswith("/kcanary/v1")
    assert predictor(export(shared, canary, "--version", "1", "--mode", "standard"))


def test_standard_mode_refuses_a_canary_it_would_ignore(shared, canary):
    error = shared.fail("export", "kserve", canary, "--image", IMAGE, "--mode", "standard")
    assert "canary" in error and "--mode serverless" in error


def test_triton_carries_the_canary_too(shared, canary):
    assert predictor(export(shared, canary, "--runtime", "triton"))[
        "canaryTrafficPercent"] == 20


def test_grpc_gets_its_own_named_port_in_standard_mode(shared, canary):
    docs = export(shared, canary, "--version", "1", "--mode", "standard")
    runtime = docs[0]["spec"]
    ports = runtime["containers"][0]["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [("http1", 8080), ("h2c", 8081)]
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    served = export(shared, canary)[0]["spec"]
    assert [p["name"] for p in served["containers"][0]["ports"]] == ["http1"]
    assert served["protocolVersions"] == ["v2"]
    assert docs[0]["metadata"]["name"] != export(shared, canary)[0]["metadata"]["name"]


def test_the_image_must_be_named(shared, canary):
    error = shared.fail("export", "kserve", canary, code=2)
    assert "--image" in error
