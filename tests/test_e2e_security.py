"""TLS, host binding warnings, and models that try to read outside their folder."""

from __future__ import annotations

import datetime
import json
import ssl

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models

pytestmark = pytest.mark.e2e


def self_signed(folder):
    """A certificate and key made now with the cryptography package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mserve-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_https(shared, affine_v1, tmp_path):
    cert, key = self_signed(tmp_path)
    d = shared.json("deploy", affine_v1, "--name", "secure", "--tls-cert", cert,
                    "--tls-key", key)["deployment"]
    assert d["url"].startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    r = httpx.get(d["url"] + "/v2/models/secure", verify=context)
    assert r.status_code == 200 and r.json()["name"] == "secure"
    with pytest.raises(httpx.HTTPError):
        httpx.get(d["url"].replace("https://", "http://") + "/v2/health/live", timeout=3)
    out = shared.json("predict", "secure", "-", input=json.dumps({"x": [[1, 2, 3, 4]]}))
    assert out["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    shared.ok("undeploy", "secure")


def test_a_bad_certificate_is_a_clean_error(shared, affine_v1, tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    key.write_text("not a key")
    err = shared.fail("deploy", affine_v1, "--name", "badtls", "--tls-cert", cert,
                      "--tls-key", key)
    assert "TLS certificate or key" in err
    assert "go together" in shared.fail("deploy", affine_v1, "--name", "x", "--tls-cert",
                                        other_cert)


def test_public_host_without_token_warns(shared, affine_v1):
    result = shared.ok("deploy", affine_v1, "--name", "open", "--host", "0.0.0.0")
    assert "Warning: binding 0.0.0.0 without --token" in result.stderr
    assert shared.deployment("open")["url"].startswith("http://127.0.0.1:")
    quiet = shared.ok("deploy", affine_v1, "--name", "closed", "--host", "0.0.0.0",
                      env={"MSERVE_TOKEN": "t"})
    assert "Warning" not in quiet.stderr
    shared.ok("undeploy", "open")
    shared.ok("undeploy", "closed")


@pytest.mark.parametrize("host, why", [("nonexistent.invalid", "Name or service not known"),
                                       ("192.0.2.1", "Cannot assign requested address")])
def test_a_host_that_cannot_be_bound_is_said_plainly(shared, affine_v1, host, why):
    """It was 'internal error in the daemon: [Errno -2] ...', with a traceback in its log."""
    error = shared.fail("deploy", affine_v1, "--name", "nohost", "--host", host,
                        env={"MSERVE_TOKEN": "t"})
    assert error.splitlines()[-1] == f"Error: cannot serve on --host '{host}': {why}", error
    assert "nohost" not in {d["name"] for d in shared.json("list")}
    assert "Traceback" not in shared.ok("daemon", "logs", "-n", "50").stdout


def test_external_data_outside_the_model_folder_is_refused(shared, tmp_path):
    """A model file is untrusted input: its external-data paths may not leave its folder."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full((4, 4), 7, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    for location in ("../secret.bin", str(secret)):
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "64")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
        model = helper.make_model(graph, opset_imports=models.OPSET)
        model.ir_version = 8
        onnx.save(model, str(folder / "model.onnx"))
        err = shared.fail("deploy", folder, "--name", "escape")
        assert "external data" in err.lower(), err
    assert all(d["name"] != "escape" for d in shared.json("list"))
