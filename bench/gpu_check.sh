#!/usr/bin/env bash
# GPU check (issue 17), on a machine with an NVIDIA GPU and its driver:
#   bench/gpu_check.sh [--duration S]
#   WHEELS=DIR bench/gpu_check.sh   # offline: no index; DIR holds the onnxruntime-gpu wheel
#                                   # (and any of mserve's needs missing), the CUDA and cuDNN
#                                   # libraries come from the python3 already there;
#                                   # wrk must be on PATH (it cannot be apt-installed then)
# Makes .venv-gpu (mserve + onnxruntime-gpu with the CUDA and cuDNN wheels it was built for),
# then runs bench/gpu_check.py: answers on CPU and GPU checked against ONNX Runtime on the
# CPU, CPU vs GPU throughput at c=1/32/64 with batch sizes, and the --workers row
# (bench/workers.py: tiny c=64, --workers 1 vs one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none)" >&2
  exit 2
fi
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/mserve" ]; then
  if [ -n "${WHEELS:-}" ]; then
    # the system's packages (numpy, grpcio, nvidia-cublas, nvidia-cudnn-cu13, ...) show through;
    # onnxruntime-gpu installed here shadows a CPU onnxruntime there
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" --no-build-isolation \
      -e . onnxruntime-gpu
  else
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e . 'onnxruntime-gpu[cuda,cudnn]'
  fi
fi
ldd "$("$VENV/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')" \
  | grep -E 'cuda|cublas|curand|cufft|not found' || true
MSERVE_BIN="$VENV/bin" "$VENV/bin/python" bench/gpu_check.py "$@"
MSERVE_BIN="$VENV/bin" "$VENV/bin/python" bench/workers.py --workers auto
