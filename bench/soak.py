"""Soak test: sustained mixed good/bad load while versions change, roll back and a worker dies.

    .venv/bin/python bench/soak.py [--duration S | --quick] [--connections N] [--chaos-every S]

A private daemon (fresh MSERVE_HOME under /tmp) serves two deployments of affine models
(y = x * scale + bias): ``soak-batch`` (x FP32 [N, 4], dynamic batch) and ``soak-fixed``
(x FP32 [2, 3], no batch dim). For the whole run, N persistent connections (asyncio streams,
half to each deployment, loopback only) send a mix of good requests (v2 JSON, v2 binary, v1)
and bad ones (malformed JSON, wrong dtype, wrong shape, unknown input, lying binary sizes, oversized
shape) to both. A chaos thread meanwhile deploys new versions and rolls back every few seconds,
``kill -9``s the daemon three times (at 20, 70 and 85 % of the run; no CLI command brings it
back: a worker starts a new daemon, which must adopt the same worker processes, and no
request may fail meanwhile) and, once in the middle, SIGKILLs the batch deployment's worker.

Every answer is classified: good served (200, numbers checked against the affine function of
the version that answered), bad answered 4xx (expected), 503 (overloaded / version unloaded;
their own line), connection errors in the killed worker's restart window (from the kill until
the worker answers again + 1 s; their own line), and FAILURES: anything else (another 5xx,
a good request that got 4xx, a bad request that got 2xx, a connection error outside the
window, a wrong answer). Each worker's RSS (VmRSS) is recorded after warm-up and at the end
(the killed worker: until the kill, and its replacement from its restart); growth must stay
under 10 %. Exit status 1 when any bar is missed. The daemon is always stopped in the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
# The CLI through this interpreter (the project venv's under `make soak`), not the `mserve`
# script: the soak does not depend on an entry point that a reinstall may be rewriting.
MSERVE = [sys.executable, "-m", "mserve.cli.main"]
RSS_LIMIT = 0.10
WINDOW_GRACE_S = 1.0
HEALTH_POLL_S = 0.02
DAEMON_KILLS = (0.4, 1.4, 1.7)  # kill -9 of the daemon, as fractions of the worker kill time
MAX_FAILURE_SAMPLES = 25


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """One deployment's signature: x FP32 of ``shape`` (-1 = dynamic batch) -> y, same shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        return self.shape[0] == -1


DEPLOYMENTS = (Model("soak-batch", (-1, 4)), Model("soak-fixed", (2, 3)))
# (scale, bias) of each model variant; values chosen so x*scale+bias is exact in FP32.
VARIANTS = [(1.0, 0.0), (2.0, 1.0), (0.5, -3.0), (-1.5, 0.25), (4.0, 8.0)]


def build_affine(path: Path, shape: tuple[int, ...], scale: float, bias: float) -> Path:
    dims = ["N" if d < 0 else d for d in shape]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    inits = [numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.array(bias, dtype=np.float32), "bias")]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]),
             helper.make_node("Add", ["xs", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "affine", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mserve-soak")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- the CLI


class CliError(RuntimeError):
    pass


class Installation:
    """A private mserve home and its daemon, driven through the CLI as a user would."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mss-", dir="/tmp"))
        self.env = {**os.environ, "MSERVE_HOME": str(self.home), "MSERVE_DRAIN_TIMEOUT": "10"}
        self.env.pop("MSERVE_NO_AUTOSTART", None)
        self.daemon_pid: int | None = None

    def cli(self, *args: str, timeout: float = 180):
        done = subprocess.run([*MSERVE, *args, "--json"], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise CliError(f"`mserve {' '.join(args)}` exited {done.returncode}: "
                           f"{done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    def start(self) -> None:
        self.daemon_pid = self.cli("daemon", "start")["pid"]

    def deployment(self, name: str) -> dict:
        for row in self.cli("list"):
            if row["name"] == name:
                return row
        raise CliError(f"no deployment {name!r}")

    def log_tracebacks(self) -> dict[str, int]:
        found = {}
        logs = self.home / "logs"
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            text = log.read_text(errors="replace")
            count = text.count("Traceback")
            if count:
                found[log.name] = count
        return found

    def close(self) -> None:
        """Stop the daemon (it drains and stops its workers); force it if it will not go."""
        try:
            subprocess.run([*MSERVE, "daemon", "stop"], env=self.env, cwd=ROOT,
                           capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"soak: `mserve daemon stop` failed ({exc}); killing the daemon", flush=True)
        pid = self._lock_pid() or self.daemon_pid
        if pid is not None and _alive(pid):
            try:  # the daemon leads its own process group (its workers included)
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for record in (self.home / "workers").glob("*.json"):  # workers outlive a daemon
            try:
                os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        shutil.rmtree(self.home, ignore_errors=True)

    def _lock_pid(self) -> int | None:
        """The daemon's pid from its lock file (when `daemon start` never answered)."""
        try:
            text = (self.home / "daemon.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- shared run state


@dataclass
class Versions:
    """version number -> (scale, bias), per deployment; filled as the chaos thread deploys."""

    by_deployment: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str, number: int, params: tuple[float, float]) -> None:
        with self.lock:
            self.by_deployment.setdefault(name, {})[number] = params

    def get(self, name: str, number: int) -> tuple[float, float] | None:
        with self.lock:
            return self.by_deployment.get(name, {}).get(number)


@dataclass
class Window:
    """The killed worker's restart window: [kill, answered again + grace]."""

    name: str | None = None
    killed_at: float | None = None
    answered_at: float | None = None
    old_pid: int | None = None
    new_pid: int | None = None

    def contains(self, name: str, t0: float, t1: float) -> bool:
        if name != self.name or self.killed_at is None:
            return False
        end = (self.answered_at + WINDOW_GRACE_S) if self.answered_at is not None else float("inf")
        return t1 >= self.killed_at and t0 <= end


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    versions_seen: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    good_latency: list[float] = field(default_factory=list)
    conn_errors: list[tuple[str, float, float, str]] = field(default_factory=list)
    deferred: list[tuple[str, int, np.ndarray, np.ndarray]] = field(default_factory=list)
    late: int = 0  # good answers checked after the run (their version was recorded late)

    def fail(self, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_FAILURE_SAMPLES:
            self.failures.append(message)


# ---------------------------------------------------------------- requests


def _values(rng: random.Random, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/8 in [-64, 64]: exact in FP32, and x*scale+bias stays exact."""
    count = int(np.prod(shape))
    return (np.array([rng.randint(-512, 512) for _ in range(count)], dtype=np.float32) / 8
            ).reshape(shape)


@dataclass
class Request:
    name: str
    kind: str
    good: bool
    path: str
    body: bytes
    headers: dict
    x: np.ndarray | None = None  # good requests: the input, for the check
    form: str = "v2"  # how to read the answer: v2, v2-binary, v1


def make_request(rng: random.Random, model: Model) -> Request:
    shape = tuple(rng.randint(1, 8) if d < 0 else d for d in model.shape)
    v2 = f"/v2/models/{model.name}/infer"
    v1 = f"/v1/models/{model.name}:predict"
    pick = rng.random()
    if pick < 0.6:  # good
        x = _values(rng, shape)
        sub = rng.random()
        if sub < 0.5:
            doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape),
                               "data": x.reshape(-1).tolist()}]}
            return Request(model.name, "good-v2-json", True, v2, json.dumps(doc).encode(), {}, x)
        if sub < 0.8:
            doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape),
                               "parameters": {"binary_data_size": x.nbytes}}],
                   "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
            header = json.dumps(doc).encode()
            return Request(model.name, "good-v2-binary", True, v2,
                           header + x.astype("<f4").tobytes(),
                           {"inference-header-content-length": str(len(header))}, x, "v2-binary")
        if model.batched:
            body = json.dumps({"instances": x.tolist()}).encode()
        else:
            body = json.dumps({"inputs": x.tolist()}).encode()
        return Request(model.name, "good-v1", True, v1, body, {}, x, "v1")
    x = _values(rng, shape)
    data = x.reshape(-1).tolist()
    inp = {"name": "x", "datatype": "FP32", "shape": list(shape), "data": data}
    kind = rng.choice(["malformed-json", "wrong-dtype", "wrong-shape", "unknown-input",
                       "lying-binary-size", "oversized-shape", "v1-wrong-shape"])
    headers: dict = {}
    path = v2
    if kind == "malformed-json":
        body = json.dumps({"inputs": [inp]}).encode()
        body = body[:rng.randint(1, len(body) - 1)]
    elif kind == "wrong-dtype":
        body = json.dumps({"inputs": [{**inp, "datatype": rng.choice(["FP64", "INT64",
                                                                       "BYTES"])}]}).encode()
    elif kind == "wrong-shape":
        bad = [*shape, 1] if rng.random() < 0.5 else [shape[0], shape[1] + 1]
        body = json.dumps({"inputs": [{**inp, "shape": bad,
                                       "data": [0.0] * int(np.prod(bad))}]}).encode()
    elif kind == "unknown-input":
        body = json.dumps({"inputs": [{**inp, "name": "nope"}]}).encode()
    elif kind == "lying-binary-size":
        declared = x.nbytes + rng.choice([-4, 4, 8])
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape),
                           "parameters": {"binary_data_size": declared}}]}
        header = json.dumps(doc).encode()
        body = header + x.astype("<f4").tobytes()
        headers = {"inference-header-content-length": str(len(header))}
    elif kind == "oversized-shape":
        big = [rng.choice([2**40, 10**12, 2**62]), *shape[1:]]
        body = json.dumps({"inputs": [{**inp, "shape": big}]}).encode()
    else:  # v1 with rows of the wrong width
        path = v1
        rows = [[1.0] * (shape[-1] + 1) for _ in range(shape[0])]
        body = json.dumps({"instances" if model.batched else "inputs": rows}).encode()
    return Request(model.name, kind, False, path, body, headers)


def read_answer(req: Request, response: Answer) -> tuple[int, np.ndarray]:
    """(version that answered, y as FP32 array) of a 200 to a good request."""
    if req.form == "v1":
        version = int(response.headers["x-model-version"])
        doc = response.json()
        y = doc["predictions"] if "predictions" in doc else doc["outputs"]
        return version, np.array(y, dtype=np.float32)
    if req.form == "v2-binary":
        length = int(response.headers["inference-header-content-length"])
        doc = json.loads(response.content[:length])
        out = doc["outputs"][0]
        y = np.frombuffer(response.content[length:], dtype="<f4").reshape(out["shape"])
        return int(doc["model_version"]), y
    doc = response.json()
    out = doc["outputs"][0]
    return int(doc["model_version"]), np.array(out["data"], dtype=np.float32).reshape(
        out["shape"])


def expected(x: np.ndarray, params: tuple[float, float]) -> np.ndarray:
    scale, bias = params
    return x * np.float32(scale) + np.float32(bias)


def check_numbers(tally: Tally, name: str, version: int, x: np.ndarray, y: np.ndarray,
                  versions: Versions) -> None:
    params = versions.get(name, version)
    if params is None:  # deployed a moment ago: the chaos thread has not recorded it yet
        tally.deferred.append((name, version, x, y))
        return
    want = expected(x, params)
    if y.shape != want.shape or not np.allclose(y, want, rtol=1e-6, atol=1e-6):
        tally.fail(f"{name} v{version}: wrong answer for x={x.tolist()}: got {y.tolist()}, "
                   f"want {want.tolist()} (scale, bias = {params})")


# ---------------------------------------------------------------- load


class ConnectionLost(Exception):
    """The connection failed or closed before a whole answer arrived."""


@dataclass
class Answer:
    """An HTTP answer, shaped like the little of httpx.Response that the checks use."""

    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Connection:
    """One persistent HTTP/1.1 keep-alive connection to 127.0.0.1:PORT over asyncio streams.

    A minimal client (the worker always answers with Content-Length) costs a fraction of
    httpx's CPU per request, so on 2 cores the workers, not the load generator, are the limit.
    """

    def __init__(self, port: int, timeout: float = 30.0):
        self.port, self.timeout = port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        try:
            return await asyncio.wait_for(self._post(path, body, headers), self.timeout)
        except ConnectionLost:
            self.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            self.close()
            raise ConnectionLost(type(exc).__name__) from None

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{self.port}",
                "content-type: application/json", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionLost("closed before the answer")
        status = int(status_line.split(b" ", 2)[1])
        answer_headers = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionLost("closed in the headers")
            key, _, value = line.decode("latin-1").partition(":")
            answer_headers[key.strip().lower()] = value.strip()
        if "content-length" not in answer_headers:
            raise ValueError("answer without content-length")
        content = await self.reader.readexactly(int(answer_headers["content-length"]))
        if answer_headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, answer_headers, content)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def connection(index: int, model: Model, port: int, stop_at: float, tally: Tally,
                     versions: Versions, seed: int) -> None:
    """One connection's loop against one deployment: mixed good and bad requests until stop."""
    rng = random.Random(seed * 1000 + index)
    conn = Connection(port)
    try:
        while time.monotonic() < stop_at:
            req = make_request(rng, model)
            tally.kinds[req.kind] += 1
            t0 = time.monotonic()
            try:
                response = await conn.post(req.path, req.body, req.headers)
            except ConnectionLost as exc:
                tally.conn_errors.append((model.name, t0, time.monotonic(), str(exc)))
                await asyncio.sleep(0.01)  # do not spin while a port is closed
                continue
            classify(req, response, time.monotonic() - t0, tally, versions)
    finally:
        conn.close()


def classify(req: Request, response: Answer, seconds: float, tally: Tally,
             versions: Versions) -> None:
    status = response.status_code
    what = f"{req.name} {req.kind}"
    if status == 503:
        tally.counts["503"] += 1
        return
    if status >= 500:
        tally.fail(f"{what}: {status} {response.text[:200]}")
        return
    if req.good:
        if status != 200:
            tally.fail(f"{what}: good request got {status} {response.text[:200]}")
            return
        try:
            version, y = read_answer(req, response)
        except Exception as exc:  # noqa: BLE001 (an unreadable 200 is a failure, not a crash)
            tally.fail(f"{what}: unreadable answer ({exc!r}): {response.content[:200]!r}")
            return
        tally.counts["good"] += 1
        tally.versions_seen[(req.name, version)] += 1
        tally.good_latency.append(seconds)
        check_numbers(tally, req.name, version, req.x, y, versions)
        return
    if 200 <= status < 300:
        tally.fail(f"{what}: bad request got {status} {response.text[:200]}")
        return
    if 400 <= status < 500:
        try:
            error = response.json().get("error")
        except ValueError:
            error = None
        if not isinstance(error, str):
            tally.fail(f"{what}: {status} without an {{\"error\": ...}} body: "
                       f"{response.content[:200]!r}")
            return
        tally.counts["bad-4xx"] += 1
        return
    tally.fail(f"{what}: unexpected status {status}")


async def run_load(urls: dict[str, str], duration: float, connections: int, tally: Tally,
                   versions: Versions, seed: int) -> float:
    """``connections`` persistent connections, split evenly over the deployments."""
    ports = {name: int(url.rsplit(":", 1)[1]) for name, url in urls.items()}
    stop_at = time.monotonic() + duration
    started = time.monotonic()
    models = [DEPLOYMENTS[i % len(DEPLOYMENTS)] for i in range(connections)]
    await asyncio.gather(*(connection(i, m, ports[m.name], stop_at, tally, versions, seed)
                           for i, m in enumerate(models)))
    return time.monotonic() - started


def run_async(coro):
    """asyncio.run, on uvloop when it is installed (an mserve dependency on Linux)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------- chaos


class Chaos(threading.Thread):
    """Deploys new versions and rolls back every ``every`` seconds, alternating deployments;
    SIGKILLs the batch deployment's worker once at ``kill_after`` seconds."""

    def __init__(self, inst: Installation, files: dict[str, list[Path]], urls: dict[str, str],
                 versions: Versions, window: Window, every: float, kill_after: float,
                 stop_at: float, warmup: float, rss: dict):
        super().__init__(name="chaos", daemon=True)
        self.inst, self.files, self.urls, self.versions = inst, files, urls, versions
        self.window, self.every, self.kill_after = window, every, kill_after
        self.stop_at, self.warmup, self.rss = stop_at, warmup, rss
        self.stats: Counter = Counter()
        self.errors: list[str] = []
        self.variant = {m.name: 0 for m in DEPLOYMENTS}
        self.stop_event = threading.Event()
        self.daemon_back_s: list[float] = []

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 (reported as a failure by the main thread)
            self.errors.append(f"chaos thread crashed: {exc!r}")

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` (less if the run ends first); False when the run is over."""
        wait = min(seconds, self.stop_at - time.monotonic())
        return not self.stop_event.wait(max(0.0, wait)) and time.monotonic() < self.stop_at - 1

    def _loop(self) -> None:
        start = time.monotonic()
        killed = False
        daemon_kills = [self.kill_after * f for f in DAEMON_KILLS]
        step = 0
        while True:
            if not self._pause(self.every):
                return
            if not killed and time.monotonic() - start >= self.kill_after:
                killed = True
                self._kill(DEPLOYMENTS[0].name)
                continue
            if daemon_kills and time.monotonic() - start >= daemon_kills[0]:
                daemon_kills.pop(0)
                self._kill_daemon()
                continue
            model = DEPLOYMENTS[(step // 2) % len(DEPLOYMENTS)]
            try:
                if step % 2 == 0:
                    self._deploy_next(model.name)
                else:
                    self._rollback(model.name)
            except CliError as exc:
                self.errors.append(str(exc))
            step += 1

    def _deploy_next(self, name: str) -> None:
        variants = self.files[name]
        index = (self.variant[name] + 1) % len(variants)
        out = self.inst.cli("deploy", str(variants[index]), "--name", name)
        self.versions.set(name, out["version"], VARIANTS[index])
        self.variant[name] = index
        self.stats["deploys" if out["changed"] else "deploys-unchanged"] += 1

    def _rollback(self, name: str) -> None:
        """Back to the newest version older than the active one: the loaded standby, or (after
        an earlier rollback) a retired version that the worker has to load again."""
        out = self.inst.cli("rollback", name)
        self.stats["rollbacks" if out["changed"] else "rollbacks-unchanged"] += 1

    def _kill_daemon(self) -> None:
        """kill -9 the daemon and, with no CLI command, wait until a worker has started a
        new one that answers; the workers must be the same processes (adopted)."""
        pids = {m.name: self.inst.deployment(m.name)["pid"] for m in DEPLOYMENTS}
        daemon = self.inst._lock_pid()
        os.kill(daemon, signal.SIGKILL)
        killed_at = time.monotonic()
        self.stats["daemon-kills"] += 1
        while time.monotonic() < killed_at + 60:
            new = self.inst._lock_pid()
            if new not in (None, daemon) and _alive(new) and \
                    self.inst.cli("daemon", "status")["running"]:
                break
            time.sleep(HEALTH_POLL_S)
        else:
            self.errors.append("no daemon came back within 60 s of a kill -9 of the daemon")
            return
        self.daemon_back_s.append(time.monotonic() - killed_at)
        after = {m.name: self.inst.deployment(m.name)["pid"] for m in DEPLOYMENTS}
        if after != pids:
            self.errors.append(f"workers were not adopted after a daemon kill: {pids} -> "
                               f"{after}")
        else:
            self.stats["adopted"] += len(after)

    def _kill(self, name: str) -> None:
        before = self.inst.deployment(name)
        pid = before["pid"]
        self.rss[name]["before_kill"] = rss_mb(pid)
        self.window.name, self.window.old_pid = name, pid
        self.window.killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.stats["kills"] += 1
        ready = self.urls[name] + "/v2/health/ready"
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get(ready).status_code == 200:
                        self.window.answered_at = time.monotonic()
                        break
                except httpx.TransportError:
                    pass
                time.sleep(HEALTH_POLL_S)
        if self.window.answered_at is None:
            self.errors.append(f"{name}'s worker did not answer within 120 s of the kill")
            return
        # Resume chaos only once the daemon shows it ready again (a deploy to a deployment that
        # is still 'loading' would restart the worker a second time).
        row = before
        while time.monotonic() < deadline:
            row = self.inst.deployment(name)
            if row["status"] == "ready" and row["pid"] not in (None, pid):
                break
            time.sleep(0.1)
        self.window.new_pid = row["pid"]
        self.rss[name]["replacement_pid"] = row["pid"]
        self.rss[name]["restarts"] = row["restarts"]
        time.sleep(self.warmup)  # the replacement's baseline, after the same warm-up as at start
        try:
            self.rss[name]["replacement_start"] = rss_mb(row["pid"])
        except (OSError, RuntimeError) as exc:
            self.errors.append(f"no RSS for the replacement worker: {exc}")


# ---------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}"


def pct(a: float, b: float) -> float:
    return (b - a) / a * 100 if a else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (180)")
    parser.add_argument("--quick", action="store_true", help="a 20 s run")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--chaos-every", type=float, default=3.0,
                        help="seconds between chaos steps (deploy or rollback)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of load before the RSS baseline (default: 10, quick: 3)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    duration = 20.0 if args.quick else args.duration
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    every = min(args.chaos_every, 2.0) if args.quick else args.chaos_every

    print(f"mserve soak: {duration:.0f} s, {args.connections} connections, chaos every "
          f"{every:g} s, one worker SIGKILL at {duration / 2:.0f} s, daemon kill -9 at "
          + ", ".join(f"{duration / 2 * f:.0f}" for f in DAEMON_KILLS) + " s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="mss-models-", dir="/tmp"))
    inst = Installation()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    date += f"; load average before the run {os.getloadavg()[0]:.2f}"
    try:
        return run(args, inst, workdir, duration, warmup, every, date)
    finally:
        inst.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run(args, inst: Installation, workdir: Path, duration: float, warmup: float, every: float,
        date: str) -> int:
    files = {m.name: [build_affine(workdir / m.name / f"v{i}.onnx", m.shape, *params)
                      for i, params in enumerate(VARIANTS)] for m in DEPLOYMENTS}
    versions, window, tally = Versions(), Window(), Tally()
    inst.start()
    urls = {}
    for m in DEPLOYMENTS:
        out = inst.cli("deploy", str(files[m.name][0]), "--name", m.name)
        versions.set(m.name, out["version"], VARIANTS[0])
        urls[m.name] = out["deployment"]["url"]
    if not all(u.startswith("http://127.0.0.1:") for u in urls.values()):
        raise SystemExit(f"refusing to load anything but loopback: {urls}")

    # Warm-up: the same load, no chaos; then the RSS baselines.
    run_async(run_load(urls, warmup, args.connections, Tally(), versions, args.seed + 99))
    rss: dict[str, dict] = {}
    for m in DEPLOYMENTS:
        pid = inst.deployment(m.name)["pid"]
        rss[m.name] = {"pid": pid, "start": rss_mb(pid)}

    stop_at = time.monotonic() + duration
    chaos = Chaos(inst, files, urls, versions, window, every, duration / 2, stop_at, warmup, rss)
    chaos.start()
    elapsed = run_async(run_load(urls, duration, args.connections, tally, versions, args.seed))
    chaos.stop_event.set()
    chaos.join(timeout=300)

    final = {m.name: inst.deployment(m.name) for m in DEPLOYMENTS}
    for m in DEPLOYMENTS:
        pid = final[m.name]["pid"]
        rss[m.name]["end_pid"] = pid
        rss[m.name]["end"] = rss_mb(pid) if pid else float("nan")
    # Versions deployed while their first answers were in flight: check them now.
    for m in DEPLOYMENTS:
        for v in inst.cli("versions", m.name):
            src = Path(v["source"]).name  # vK.onnx
            versions.set(m.name, v["version"], VARIANTS[int(src[1:].split(".")[0])])
    deferred, tally.deferred = tally.deferred, []
    tally.late = len(deferred)
    for name, version, x, y in deferred:
        check_numbers(tally, name, version, x, y, versions)
    for name, version, *_ in tally.deferred:
        tally.fail(f"{name}: answered by version {version}, which no deploy recorded")

    # Connection errors: in the killed worker's window, or failures.
    in_window = Counter()
    for name, t0, t1, kind in tally.conn_errors:
        if window.contains(name, t0, t1):
            in_window[kind] += 1
        else:
            tally.fail(f"{name}: connection error {kind} outside the restart window "
                       f"(at {t1 - (stop_at - duration):.2f} s)")
    for error in chaos.errors:
        tally.fail(f"chaos: {error}")
    if window.killed_at is None:
        tally.fail("the worker was never killed (run too short?)")

    return report(args, inst, date, duration, elapsed, every, warmup, tally, in_window, window,
                  chaos,
                  rss, final, stop_at)


def report(args, inst, date, duration, elapsed, every, warmup, tally: Tally, in_window: Counter,
           window: Window, chaos: Chaos, rss: dict, final: dict, stop_at: float) -> int:
    started = stop_at - duration
    total = (sum(tally.counts.values()) + tally.failure_count + sum(in_window.values()))
    good, bad = tally.counts["good"], tally.counts["bad-4xx"]
    lat = sorted(tally.good_latency)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: 0.0)
    lines = [
        "",
        f"mserve soak report — {date}",
        f"machine: {machine()}; Python {platform.python_version()}",
        (f"run: {duration:.0f} s of load ({elapsed:.1f} s measured), {args.connections} "
         f"connections, 2 deployments ({', '.join(m.name for m in DEPLOYMENTS)}), "
         f"chaos every {every:g} s"),
        "",
        f"requests                       {total:>9}  ({total / max(elapsed, 1e-9):.0f}/s)",
        (f"  good served (200, checked)   {good:>9}  (p50 {p(0.5):.1f} ms, "
         f"p99 {p(0.99):.1f} ms; {tally.late} checked after the run)"),
        f"  bad answered 4xx (expected)  {bad:>9}",
        f"  503 (overloaded / unloaded)  {tally.counts['503']:>9}",
        (f"  conn errors, restart window  {sum(in_window.values()):>9}"
         + (f"  ({', '.join(f'{k} {v}' for k, v in sorted(in_window.items()))})"
            if in_window else "")),
        f"  FAILURES                     {tally.failure_count:>9}",
    ]
    if window.killed_at is not None:
        answered = (f"answered again after {window.answered_at - window.killed_at:.2f} s"
                    if window.answered_at else "never answered again")
        lines.append(f"kill: {window.name} worker pid {window.old_pid} SIGKILLed at "
                     f"{window.killed_at - started:.1f} s, {answered} (new pid "
                     f"{window.new_pid}); window = kill .. answered + {WINDOW_GRACE_S:g} s")
    back = chaos.daemon_back_s
    lines.append(f"daemon: {chaos.stats['daemon-kills']} kill -9s under load; a new daemon "
                 "(started by a worker, no CLI command) answered after "
                 + (f"{min(back):.2f}-{max(back):.2f} s" if back else "-")
                 + f"; workers adopted with the same pids: {chaos.stats['adopted']}")
    lines.append(f"chaos: {chaos.stats['deploys']} deploys of a new version, "
                 f"{chaos.stats['rollbacks']} rollbacks, {chaos.stats['kills']} kill; "
                 f"chaos errors {len(chaos.errors)}")
    for m in DEPLOYMENTS:
        seen = sorted((v, n) for (name, v), n in tally.versions_seen.items() if name == m.name)
        d = final[m.name]
        lines.append(f"{m.name}: final version {d['version']} ({d['status']}, restarts "
                     f"{d['restarts']}); good answers by version: "
                     + ", ".join(f"v{v} {n}" for v, n in seen))
    lines.append("request mix: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    lines.append("")
    lines.append(f"worker RSS (VmRSS, MB; baseline after {warmup:g} s of warm-up load; "
                 f"limit +{RSS_LIMIT * 100:.0f}%):")
    rss_ok = True
    for m in DEPLOYMENTS:
        r = rss[m.name]
        if "replacement_start" in r:
            g1 = pct(r["start"], r["before_kill"])
            g2 = pct(r["replacement_start"], r["end"])
            rss_ok &= (g1 < RSS_LIMIT * 100 and g2 < RSS_LIMIT * 100
                       and r["end_pid"] == r["replacement_pid"])
            lines.append(f"  {m.name:<11} pid {r['pid']}: {r['start']:.1f} -> "
                         f"{r['before_kill']:.1f} at the kill ({g1:+.1f}%)")
            lines.append(f"  {'':<11} replacement pid {r['replacement_pid']}: "
                         f"{r['replacement_start']:.1f} after restart + warm-up -> "
                         f"{r['end']:.1f} at the end ({g2:+.1f}%)")
        else:
            g = pct(r["start"], r["end"])
            same = r["end_pid"] == r["pid"]
            rss_ok &= g < RSS_LIMIT * 100 and same
            lines.append(f"  {m.name:<11} pid {r['pid']}: {r['start']:.1f} -> {r['end']:.1f} at "
                         f"the end ({g:+.1f}%)" + ("" if same else
                                                   f"  (pid changed to {r['end_pid']}!)"))
    traces = inst.log_tracebacks()
    lines.append("tracebacks in the logs: " + (", ".join(f"{k} {v}" for k, v in traces.items())
                                                if traces else "none"))
    if tally.failures:
        lines.append("")
        lines.append(f"first {len(tally.failures)} failures:")
        lines += [f"  - {f}" for f in tally.failures]
    passed = tally.failure_count == 0 and rss_ok and good > 0 and bad > 0
    lines.append("")
    lines.append("RESULT: " + ("PASS" if passed else "FAIL") +
                 f" (failures {tally.failure_count}, RSS growth "
                 f"{'< ' if rss_ok else '>= '}{RSS_LIMIT * 100:.0f}%)")
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
