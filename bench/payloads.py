"""Request bodies (OIP JSON and Triton's binary tensor extension) and a one-shot check that a
contender answers them with the right numbers before it is put under load."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Body:
    """One request body on disk, as wrk's post.lua sends it."""

    path: Path
    content_type: str
    header_len: int | None = None  # Inference-Header-Content-Length, binary bodies only

    def headers(self) -> dict[str, str]:
        """The HTTP headers that go with this body."""
        headers = {"Content-Type": self.content_type}
        if self.header_len is not None:
            headers["Inference-Header-Content-Length"] = str(self.header_len)
        return headers


def json_body(x: np.ndarray, path: Path) -> Body:
    """``{"inputs": [{"name": "x", "shape": [1, F], "datatype": "FP32", "data": [...]}]}``."""
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.ravel().tolist()}]}
    path.write_text(json.dumps(doc))
    return Body(path, "application/json")


def binary_body(x: np.ndarray, path: Path) -> Body:
    """JSON header asking for a binary ``y``, followed by the raw little-endian float32 of x."""
    raw = x.astype("<f4").tobytes()
    header = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": len(raw)}}],
              "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    head = json.dumps(header).encode()
    path.write_bytes(head + raw)
    return Body(path, "application/octet-stream", header_len=len(head))


def decode_output(data: bytes, header_len: str | None, name: str = "y") -> np.ndarray:
    """Output ``name`` from a v2 response, JSON or with binary tensors appended."""
    head = data if header_len is None else data[:int(header_len)]
    doc = json.loads(head)
    offset = 0 if header_len is None else int(header_len)
    for out in doc["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out["name"] == name:
            if size is None:
                return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            raw = data[offset:offset + size]
            return np.frombuffer(raw, dtype="<f4").reshape(out["shape"])
        offset += size or 0
    raise ValueError(f"no output {name!r} in the response: {head[:200]!r}")


def check_answer(url: str, body: Body, expected: np.ndarray) -> str | None:
    """POST ``body`` once; None when the answer matches ``expected``, else what is wrong."""
    request = urllib.request.Request(url, data=body.path.read_bytes(), method="POST",
                                     headers=body.headers())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            got = decode_output(data, response.headers.get("Inference-Header-Content-Length"))
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return mismatch(got, expected)


def mismatch(got: np.ndarray, expected: np.ndarray) -> str | None:
    """None when ``got`` is ``expected`` (to float32 tolerance), else what is wrong."""
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        return f"wrong answer: got {got.ravel()[:4]}..., expected {expected.ravel()[:4]}..."
    return None
