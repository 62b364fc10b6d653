"""The recs pipeline row (issue 16): `.venv/bin/python bench/pipeline.py [--duration S]`.

examples/recs served two ways on 127.0.0.1 and loaded by wrk with one user id per request,
at c=1 and c=32, in interleaved rounds (3 by default): mserve (`deploy model.onnx
--transformer recs.py`: preprocess reads SQLite, the model runs in dynamic batches,
postprocess takes the top five) and the same pipeline as a FastAPI app (bench/recs_fastapi.py,
bench/.venv). Each answer is checked against the other's first. The time mserve spends in
user code per request comes from its own histograms (mserve_request_preprocess_seconds,
..._postprocess_seconds); the mean batch from mserve_batch_size. Where kserve installs in
bench/.venv, the same pipeline as KServe deploys one is measured too: a Transformer
(bench/recs_kserve.py) in front of a predictor (bench/kserve_server.py), two ModelServer
processes talking REST v2. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import urllib.request
from pathlib import Path

import loadgen
import servers
from mservectl import Mserve
from payloads import Body

HERE = Path(__file__).parent
EXAMPLE = HERE.parent / "examples" / "recs"
WORK = HERE / ".work" / "pipeline"
BODY = {"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": [42]}]}


def answer(url: str) -> dict:
    request = urllib.request.Request(url, json.dumps(BODY).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        outputs = json.load(response)["outputs"]
    return {o["name"]: o["data"] for o in outputs}


def sums(metrics_url: str) -> dict[str, float]:
    """The user-code and batch histograms' sums and counts, all versions added."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for key in ("mserve_request_preprocess_seconds_sum",
                    "mserve_request_postprocess_seconds_sum",
                    "mserve_request_preprocess_seconds_count",
                    "mserve_batch_size_sum", "mserve_batch_size_count"):
            if line.startswith(key + "{") or line.startswith(key + " "):
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    body = WORK / "body.json"
    body.write_text(json.dumps(BODY))
    wrk = loadgen.ensure_wrk()
    servers.ensure_venv()
    mserve = Mserve()
    results: dict[tuple[str, int], list] = {}
    try:
        d, _ = mserve.cli("deploy", str(EXAMPLE / "model.onnx"), "--name", "recs",
                          "--transformer", str(EXAMPLE / "recs.py"))
        ours = d["deployment"]["url"]
        (WORK / "logs").mkdir(exist_ok=True)
        with contextlib.ExitStack() as stack:
            urls = {"mserve": ours, **start_others(stack)}
            a = answer(f"{ours}/v2/models/recs/infer")
            for who, url in urls.items():
                b = answer(f"{url}/v2/models/recs/infer")
                if a["product_ids"] != b["product_ids"] or any(
                        abs(x - y) > 1e-5 * max(1.0, abs(y))
                        for x, y in zip(a["scores"], b["scores"])):
                    raise SystemExit(f"{who} answers differently from mserve: {b} vs {a}")
            for _ in range(args.rounds):
                for conc in (1, 32):
                    for who, url in urls.items():
                        before = sums(f"{ours}/metrics") if who == "mserve" else {}
                        target = f"{url}/v2/models/recs/infer"
                        loadgen.run_wrk(wrk, target, Body(body, "application/json"), conc, 1)
                        run = loadgen.run_wrk(wrk, target, Body(body, "application/json"),
                                              conc, args.duration)
                        after = sums(f"{ours}/metrics") if who == "mserve" else {}
                        results.setdefault((who, conc), []).append((run, before, after))
    finally:
        mserve.close(WORK / "mserve-logs")
    print(table(results))
    return 0


def start_others(stack: contextlib.ExitStack) -> dict[str, str]:
    """The FastAPI app, and the KServe Transformer in front of its predictor (two
    ModelServers) where kserve installed in bench/.venv: name -> base URL."""
    logs = WORK / "logs"
    fastapi = stack.enter_context(servers.Server("recs_fastapi.py", EXAMPLE, "recs",
                                                 "/v2/health/ready", logs))
    urls = {"fastapi": fastapi.url}
    if servers.ensure_venv().kserve_error:
        print("KServe Transformer + predictor: not measured, kserve did not install in "
              "bench/.venv")
        return urls
    predictor = stack.enter_context(servers.Server("kserve_server.py", EXAMPLE / "model.onnx",
                                                   "recs", "/v2/models/{name}/ready", logs))
    transformer = servers.Server("recs_kserve.py", EXAMPLE, "recs", "/v2/models/{name}/ready",
                                 logs)
    transformer.cmd.append(f"127.0.0.1:{predictor.port}")
    urls["kserve"] = stack.enter_context(transformer).url
    return urls


def table(results) -> str:
    lines = ["| pipeline | c | req/s (min–med–max) | p50 | p99 | in user code per request¹ | "
             "mean batch | errors |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    order = {"mserve": 0, "fastapi": 1, "kserve": 2}
    for (who, conc), runs in sorted(results.items(), key=lambda i: (i[0][1], order[i[0][0]])):
        rps = [r.rps for r, _, _ in runs]
        p50 = statistics.median(r.p50_ms for r, _, _ in runs)
        p99 = statistics.median(r.p99_ms for r, _, _ in runs)
        errors = sum(r.errors for r, _, _ in runs)
        user, batch = "n/a", "n/a"
        if who == "mserve":
            delta = {k: sum(a.get(k, 0) - b.get(k, 0) for _, b, a in runs) for k in runs[0][2]}
            count = delta.get("mserve_request_preprocess_seconds_count") or 0
            if count:
                spent = (delta["mserve_request_preprocess_seconds_sum"]
                         + delta["mserve_request_postprocess_seconds_sum"]) / count
                user = f"{spent * 1e6:,.0f} µs"
            if delta.get("mserve_batch_size_count"):
                batch = f"{delta['mserve_batch_size_sum'] / delta['mserve_batch_size_count']:.2f}"
        name = {"mserve": "mserve `--transformer recs.py`", "fastapi": "FastAPI app (same code)",
                "kserve": "KServe Transformer + predictor (2 ModelServers)"}[who]
        lines.append(f"| {name} | {conc} | {min(rps):,.0f}–{statistics.median(rps):,.0f}–"
                     f"{max(rps):,.0f} | {p50:.3g} ms | {p99:.3g} ms | {user} | {batch} | "
                     f"{errors} |")
    lines.append("\n¹ preprocess + postprocess, waiting for a thread of the transformer pool "
                 "included (MSERVE_TRANSFORMER_THREADS, 4), from mserve's own histograms.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
