"""Print mserve's runtime requirements for one image variant, read from pyproject.toml.

``cpu`` swaps onnxruntime-gpu for plain onnxruntime (a wheel about 20 times smaller);
``gpu`` keeps onnxruntime-gpu with its ``cuda`` and ``cudnn`` extras: the CUDA and cuDNN
libraries it was built for come as wheels (CUDA 13 for onnxruntime-gpu 1.31), so any base
image works and only the driver comes from the host (the NVIDIA container toolkit). Used by
the Dockerfile; stdlib only (Python 3.11+).

    python3 docker/requirements.py cpu > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(variant: str, pyproject: Path = PYPROJECT) -> list[str]:
    if variant not in ("cpu", "gpu"):
        raise SystemExit(f"unknown variant {variant!r}: use cpu or gpu")
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for requirement in declared:
        spec = requirement.split(";", 1)[0].strip()
        project = re.split(r"[\s<>=!~\[]", spec, maxsplit=1)[0].lower()
        if variant == "cpu" and project == "onnxruntime-gpu":
            continue
        if variant == "gpu" and project == "onnxruntime-gpu":
            requirement = re.sub(r"^onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]", requirement)
        out.append(spec if variant == "cpu" and project == "onnxruntime" else requirement)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
