"""``--device``: cuda and cuda:N fail with the reason CUDA cannot be used (the libraries the
provider misses, or the driver), auto falls back and says why in status, a bad device is bad
usage. On a machine where CUDA works these checks skip (bench/gpu_check.sh covers it)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

pytestmark = pytest.mark.e2e


def cuda_usable(mserve) -> bool:
    d = next((d for d in mserve.json("list") if d["name"] == "dev-auto"), None)
    return d is not None and d["device"] == "cuda"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_that_cannot_be_used_fails_the_deploy_with_the_reason(mserve, affine_v1, device):
    mserve.ok("deploy", affine_v1, "--name", "dev-auto")
    if cuda_usable(mserve):
        pytest.skip("CUDA works on this machine")
    error = mserve.fail("deploy", affine_v1, "--name", f"dev-{device.replace(':', '')}",
                        "--device", device)
    assert f"device '{device}' was asked for but CUDA cannot be used: " in error, error
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert ("libraries onnxruntime-gpu" in error and "missing" in error) \
            or "driver" in error or "GPU" in error, error
    else:
        assert "no CUDA provider (install onnxruntime-gpu)" in error, error
    assert all(d["name"] != f"dev-{device.replace(':', '')}" for d in mserve.json("list"))


def test_auto_says_why_it_runs_on_the_cpu(mserve, affine_v1):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("plain onnxruntime: auto never tries CUDA, nothing to explain")
    mserve.ok("deploy", affine_v1, "--name", "dev-auto")
    if cuda_usable(mserve):
        pytest.skip("CUDA works on this machine")
    status = mserve.json("status", "dev-auto")
    assert status["device"] == "cpu"
    assert status["device_note"].startswith("CUDA not used ("), status["device_note"]
    assert "device:" in mserve.ok("status", "dev-auto").stdout


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_a_bad_device_is_bad_usage(mserve, affine_v1, device):
    error = mserve.fail("deploy", affine_v1, "--name", "dev-bad", "--device", device, code=2)
    assert "--device must be auto (CUDA if usable, else the CPU), cpu, cuda or cuda:N" in error
