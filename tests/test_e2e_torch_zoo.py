"""Models exported by real PyTorch (tests/torch_zoo.py), served by one real daemon: each
export deployed with default options and again with ``--batch-delay-ms 5``, then asked over
JSON, Triton's binary tensors and gRPC, one request alone and 32 at once of mixed sizes.
Every answer must equal ONNX Runtime's in-process on the same input and torch's own output.
The batching decision of each deployment is checked (time-major RNNs and NonZero never
batch, the MLP and CNN must, and do form runs of more than one request under load) and
shown at the end. Needs torch (``make zoo`` installs the CPU wheel); skipped without it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

try:
    import torch
except ImportError as exc:  # the test extras leave torch out: `make test` passes without it
    pytest.skip(f"PyTorch cannot be imported ({exc}); `make zoo` installs the CPU wheel and "
                "runs this file", allow_module_level=True)

import tritonclient.grpc as tg  # noqa: E402

from tests import torch_zoo, zoo  # noqa: E402
from tests.conftest import Mserve, installation, wait_for  # noqa: E402
from tests.test_e2e_zoo import (BURST, SENDERS, Served, burst, describe,  # noqa: E402
                                differences, expected, requests_for, send_json)

pytestmark = pytest.mark.e2e
PROTOCOLS = ("json", "binary", "grpc")
VARIANTS = {"default": (), "delay5": ("--batch-delay-ms", "5")}
DEPLOYMENTS = {f"{e}-{v}": (e, v) for e in torch_zoo.NAMES for v in VARIANTS}
BURSTS = 3  # at most, per batching deployment (see the load test)
LOG_WAIT_S = 15.0
REPORT_ENV = "MSERVE_TORCH_ZOO_REPORT"  # a path: the record below is also written there


@dataclass
class TorchFarm:
    mserve: Mserve
    exports: dict[str, torch_zoo.Export]
    served: dict[str, Served]  # by deployment name
    http: httpx.Client
    pool: ThreadPoolExecutor
    record: dict[str, dict] = field(default_factory=dict)  # by deployment name

    def export_of(self, deployment: str) -> torch_zoo.Export:
        return self.exports[DEPLOYMENTS[deployment][0]]

    def note(self, deployment: str, **facts) -> None:
        self.record.setdefault(deployment, {}).update(facts)


@pytest.fixture(scope="module")
def farm(request):
    """Export the torch zoo into a temp folder, deploy every export twice on one daemon,
    delete the sources (the store holds its own copies), then share an HTTP client and
    32 threads; the record is shown (and written to $MSERVE_TORCH_ZOO_REPORT) at the end."""
    folder = Path(tempfile.mkdtemp(prefix="ms-torch-zoo-"))
    home = installation()
    mserve, served, result = next(home), {}, None
    try:
        exports = torch_zoo.export_all(folder)
        sessions = {n: zoo.reference_session(e.path) for n, e in exports.items() if not e.error}
        for deployment, (name, variant) in DEPLOYMENTS.items():
            if name in sessions:
                served[deployment] = deploy(mserve, exports[name], deployment,
                                            VARIANTS[variant], sessions[name])
        shutil.rmtree(folder, ignore_errors=True)
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=BURST)) as http, \
                ThreadPoolExecutor(BURST) as pool:
            result = TorchFarm(mserve, exports, served, http, pool)
            yield result
    finally:
        for s in served.values():
            if s.grpc is not None:
                s.grpc.close()
        next(home, None)  # stops the daemon and its workers, removes the home
        shutil.rmtree(folder, ignore_errors=True)
        if result is not None:
            _report(request.config, result)


def deploy(mserve: Mserve, export: torch_zoo.Export, name: str, options: tuple,
           session) -> Served:
    """``mserve deploy`` of the export's .onnx FILE (its model.onnx.data beside it)."""
    s = Served(export.as_zoo_model(name), session=session,
               outputs=tuple(o.name for o in session.get_outputs()))
    result = mserve.run("deploy", export.path, "--name", name, *options, "--json")
    if result.returncode:
        s.error = (result.stderr or result.stdout).strip()
    else:
        deployment = json.loads(result.stdout)["deployment"]
        s.url, s.grpc = deployment["url"], tg.InferenceServerClient(deployment["grpc_url"])
    return s


def exported(farm: TorchFarm, name: str) -> torch_zoo.Export:
    """The export, or a skip saying why torch gave none."""
    e = farm.exports[name]
    if e.error:
        if e.spec.optional or "onnxscript" in e.error:
            pytest.skip(e.error)
        pytest.fail(e.error)
    return e


def deployed(farm: TorchFarm, deployment: str) -> Served:
    """The serving deployment, or a skip when mserve refused an export that ONNX Runtime
    itself cannot run at every size (test_deploy checks that refusal)."""
    e = exported(farm, DEPLOYMENTS[deployment][0])
    s = farm.served[deployment]
    if s.error:
        if e.note:
            pytest.skip(f"mserve refused {deployment} ({e.note}): {s.error[:200]}")
        pytest.fail(f"deploying {deployment} failed: {s.error}")
    return s


# ---- the tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", torch_zoo.NAMES)
def test_export(farm, name):
    """The dynamo exporter writes external data next to the .onnx; TorchScript one file."""
    e = exported(farm, name)
    for deployment, (export, _) in DEPLOYMENTS.items():
        if export == name:
            farm.note(deployment, exporter=e.exporter, files=e.files, note=e.note)
    want = ["model.onnx", "model.onnx.data"] if e.exporter == "dynamo" else ["model.onnx"]
    assert e.files == want


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_deploy(farm, deployment):
    """Every export deploys, except one that does not run at the size warm-up uses: that
    one is refused with the warm-up's error, the deployment not serving."""
    e = exported(farm, DEPLOYMENTS[deployment][0])
    s = farm.served[deployment]
    farm.note(deployment, deploy=s.error.splitlines()[0][:160] if s.error else "ok")
    if not s.error:
        return
    if not e.note:
        pytest.fail(f"deploying {deployment} failed: {s.error}")
    assert s.error.startswith("Error: the model loaded but failed its warm-up run"), s.error
    listed = {d["name"]: d for d in farm.mserve.json("list")}
    assert listed.get(deployment, {"status": "failed"})["status"] != "ready"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_answer_matches_onnxruntime_and_torch(farm, deployment, protocol):
    s = deployed(farm, deployment)
    e = farm.export_of(deployment)
    requests = requests_for(s.model, seed=PROTOCOLS.index(protocol))

    def send(req):
        return SENDERS[protocol](farm.http, s, req)

    answers = [send(requests[0])] + burst(farm.pool, send, requests[1:])
    wrong = []
    for i, (req, got) in enumerate(zip(requests, answers)):
        if isinstance(got, Exception):
            problems = [f"{type(got).__name__}: {got}"]
        else:
            problems = differences(s.model, expected(s, req), got) + \
                [f"torch: {p}" for p in torch_zoo.torch_differences(e.reference(req), got)]
        if problems:
            kind = "alone" if i == 0 else "concurrent"
            wrong.append(f"{deployment}/{protocol} request {i} ({kind}, {describe(req)}): "
                         + "; ".join(problems))
    farm.note(deployment, **{protocol: f"{len(requests) - len(wrong)}/{len(requests)} right"})
    if wrong:
        pytest.fail(f"{len(wrong)} of {len(requests)} answers wrong:\n" + "\n".join(wrong))


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_batching_decision(farm, deployment):
    """What ``mserve status --json`` says under ``batching``; time-major RNNs and NonZero
    must not batch, the MLP and the CNN must."""
    deployed(farm, deployment)
    spec = farm.export_of(deployment).spec
    decision = farm.mserve.json("status", deployment)["batching"]
    farm.note(deployment, batching=decision)
    if spec.batching == torch_zoo.MUST:
        assert decision["enabled"] is True, decision
    elif spec.batching == torch_zoo.NEVER:
        assert decision["enabled"] is False, decision


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_batched_deployments_form_runs_under_load(farm, deployment):
    """A batcher that never joins would pass every answer test: bursts of 32 concurrent
    requests to a batching deployment must share runs (the request log's ``batch``). With
    no batch delay a burst can be served one by one (a tiny model runs faster than the
    client threads send), so up to ``BURSTS`` bursts are sent, stopping at the first that
    shares a run."""
    s = deployed(farm, deployment)
    spec = farm.export_of(deployment).spec
    enabled = farm.mserve.json("status", deployment)["batching"]["enabled"]
    if not enabled:
        assert spec.batching != torch_zoo.MUST
        pytest.skip(f"{deployment} does not batch")
    for attempt in range(1, BURSTS + 1):
        sizes = _burst_runs(farm, s, f"{deployment}-load{attempt}", seed=6 + attempt)
        if sizes[0] > 1:
            break
    farm.note(deployment, runs=_runs(sizes) + f" (burst {attempt} of up to {BURSTS})")
    assert sizes[0] > 1, f"{deployment}: in {BURSTS} bursts every run held one request"


def _burst_runs(farm: TorchFarm, s: Served, prefix: str, seed: int) -> list[int]:
    """Send one burst of BURST requests with ids; the logged batch sizes, largest first."""
    ids = [f"{prefix}-{i}" for i in range(BURST)]
    jobs = list(zip(ids, requests_for(s.model, seed=seed)[1:]))
    answers = burst(farm.pool, lambda job: send_json(farm.http, s, job[1], job[0]), jobs)
    assert not [a for a in answers if isinstance(a, Exception)], answers
    entries = _logged(farm.mserve, s.model.name, ids)
    return sorted((e["batch"] or 1 for e in entries.values()), reverse=True)


def _logged(mserve: Mserve, name: str, ids: list[str], timeout: float = LOG_WAIT_S) -> dict:
    """The request-log entries of ``ids`` once all are there (the worker flushes its log
    every second; a busy 2-core machine can take longer to get to it)."""
    found: dict[str, dict] = {}

    def complete() -> bool:
        found.update((e["id"], e) for e in mserve.json("logs", name, "-n", "200")
                     if e["id"] in ids)
        return len(found) == len(ids)
    try:
        wait_for(complete, timeout=timeout, interval=0.2, what=f"{name}'s request log")
    except AssertionError:
        missing = sorted(set(ids) - set(found), key=ids.index)
        raise AssertionError(f"after {timeout} s the request log of {name} lacks "
                             f"{len(missing)} of {len(ids)} answered requests: {missing}")
    return found


def _runs(sizes: list[int]) -> str:
    """'largest run N requests, M of 32 requests in shared runs' from logged batch sizes."""
    shared = sum(1 for n in sizes if n > 1)
    return f"largest run {sizes[0] if sizes else 0}, {shared} of {len(sizes)} in shared runs"


# ---- the record --------------------------------------------------------------------------

def _report(config, farm: TorchFarm) -> None:
    """One line per deployment: exporter, deploy, batching decision, answers, runs."""
    record = {"torch": torch.__version__, "deployments": farm.record,
              "skipped_exports": {n: e.error for n, e in farm.exports.items() if e.error}}
    if path := os.environ.get(REPORT_ENV):
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        _write(reporter, farm, record["skipped_exports"])


def _write(reporter, farm: TorchFarm, skipped: dict[str, str]) -> None:
    reporter.ensure_newline()
    reporter.write_sep("-", f"torch zoo: torch {torch.__version__}")
    for name, row in farm.record.items():
        parts = [f"deploy {row.get('deploy', '-')}"]
        if decision := row.get("batching"):
            parts.append(f"batching {'on' if decision['enabled'] else 'off'}: "
                         f"{decision['reason']}")
        parts += [f"{p} {row[p]}" for p in PROTOCOLS if p in row]
        parts += [row[k] for k in ("runs", "note") if row.get(k)]
        reporter.write_line(f"{name}: " + "; ".join(parts))
    for name, error in skipped.items():
        reporter.write_line(f"{name}: not exported: {error}")
