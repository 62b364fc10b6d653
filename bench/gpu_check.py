"""GPU check (issue 17): `bench/gpu_check.sh` on a machine with an NVIDIA GPU.

Deploys a small conv net (built here with the onnx helper API: Conv 3->32 3x3, Relu, Conv
32->64, Relu, GlobalAveragePool, Gemm 10; NCHW 3x64x64, dynamic batch) and the bench's `mlp`
twice each, `--device cpu` and `--device cuda`, checks every deployment's answers against
ONNX Runtime run in-process on the CPU, prints what `mserve list` reports for the CUDA ones
(device, providers) and the GPU lines of /metrics, then CPU against GPU throughput (wrk, HTTP
binary tensors) at c=1, 32 and 64 with the mean batch each formed. Without a usable GPU it
says why (the reason `--device cuda` gives) and exits 2. `--device-only cpu` runs the CPU
half alone (how the script is tested on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import cost
import loadgen
import models
import payloads
from mservectl import Mserve, MserveError

HERE = Path(__file__).parent
WORK = HERE / ".work" / "gpu"
CONCURRENCY = (1, 32, 64)


def convnet(path: Path) -> Path:
    rng = np.random.default_rng(17)

    def weight(name: str, *shape: int) -> object:
        fan_in = int(np.prod(shape[1:])) or shape[0]
        data = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return numpy_helper.from_array(data, name)

    inits = [weight("W1", 32, 3, 3, 3), weight("W2", 64, 32, 3, 3), weight("W3", 64, 10),
             numpy_helper.from_array(np.zeros(10, np.float32), "B3")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["y"])]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=models.OPSET, ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def gpu_lines(url: str) -> list[str]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return [line for line in text.splitlines() if line.startswith("mserve_gpu")]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--device-only", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    inputs = {"conv": np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32),
              "mlp": models.sample_input("mlp")}
    files = {"conv": convnet(WORK / "conv.onnx"), "mlp": models.build("mlp", WORK / "mlp.onnx")}
    devices = [args.device_only] if args.device_only else ["cpu", "cuda"]
    wrk = loadgen.ensure_wrk()
    mserve = Mserve()
    rows = []
    try:
        for model, path in files.items():
            x = inputs[model]
            body = payloads.binary_body(x, WORK / f"{model}.bin")
            expected = reference(path, x)
            for device in devices:
                name = f"{model}-{device}"
                try:
                    d, _ = mserve.cli("deploy", str(path), "--name", name, "--device", device)
                except MserveError as exc:
                    print(f"{name}: {exc}")
                    return 2
                d = d["deployment"]
                url = f"{d['url']}/v2/models/{name}/infer"
                if problem := payloads.check_answer(url, body, expected):
                    print(f"{name} answers wrong: {problem}")
                    return 1
                listed = mserve.deployment(name)
                print(f"{name}: right answer; device {listed['device']}"
                      + (f" ({listed['device_note']})" if listed.get("device_note") else ""))
                for line in gpu_lines(d["url"]):
                    print(f"  {line}")
                for conc in CONCURRENCY:
                    before = cost.mserve_batches(d["url"], name)()
                    loadgen.run_wrk(wrk, url, body, conc, 1)
                    run = loadgen.run_wrk(wrk, url, body, conc, args.duration)
                    after = cost.mserve_batches(d["url"], name)()
                    rows.append((model, device, conc, run, _mean_batch(before, after)))
    finally:
        mserve.close(WORK / "mserve-logs")
    print(table(rows))
    return 0


def _mean_batch(before, after) -> str:
    requests, runs = after[0] - before[0], after[1] - before[1]
    return f"{requests / runs:.2f}" if runs else "n/a"


def table(rows) -> str:
    lines = ["| model | device | c | req/s | p50 | p99 | mean batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, device, conc, run, batch in rows:
        lines.append(f"| {model} | {device} | {conc} | {run.rps:,.0f} | {run.p50_ms:.3g} ms | "
                     f"{run.p99_ms:.3g} ms | {batch} | {run.errors} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
