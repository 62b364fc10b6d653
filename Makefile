# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_HOME ?= $(CURDIR)/.mserve-demo

.PHONY: demo test install clean demo-stop completions bench soak zoo perf-analyzer \
        perf-analyzer-tools image image-offline

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -qq -e '.[test]'

# Deploy the example iris classifier and the recs pipeline (docs/pipelines.md), predict, list.
# State lives in .mserve-demo/ (MSERVE_HOME); stop the daemon with `make demo-stop`.
demo: install
	@export MSERVE_HOME=$(DEMO_HOME); set -e; \
	$(BIN)/mserve daemon start; \
	$(BIN)/mserve deploy examples/iris/model.onnx --name iris; \
	echo; echo '$$ mserve predict iris examples/iris/input.json'; \
	$(BIN)/mserve predict iris examples/iris/input.json; \
	$(BIN)/mserve deploy examples/recs/model.onnx --name recs --transformer examples/recs/recs.py; \
	echo; echo '$$ mserve predict recs examples/recs/input.json   # user ids -> top-5 products'; \
	$(BIN)/mserve predict recs examples/recs/input.json; \
	echo; echo '$$ mserve list'; \
	$(BIN)/mserve list; \
	echo; echo "Try: MSERVE_HOME=$(DEMO_HOME) $(BIN)/mserve --help   (stop it: make demo-stop)"

demo-stop:
	MSERVE_HOME=$(DEMO_HOME) $(BIN)/mserve daemon stop

# perf_analyzer's test runs when its tools can be had here (downloaded once into .venv-pa);
# without them it skips, saying why.
test: install
	-@$(MAKE) --no-print-directory perf-analyzer-tools >/dev/null 2>&1 \
	  || echo "make test: perf_analyzer could not be installed; tests/test_perf_analyzer.py will skip"
	$(BIN)/python -m pytest -q

# Benchmarks against a FastAPI baseline, KServe, NVIDIA Triton (PyTriton) and MLServer, in
# interleaved rounds of one run, then the recs pipeline against the same as a FastAPI app,
# then one deployment on --workers 1 and on one process per core (docs/benchmarks.md).
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/pipeline.py $(PIPELINE_ARGS)
	$(BIN)/python bench/workers.py $(WORKERS_ARGS)

# Mixed good/bad load, deploys, rollbacks and a worker kill (docs/reliability.md).
soak: install
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# Models exported by real PyTorch (CPU wheel, into $(VENV)) served and checked against
# ONNX Runtime and torch itself (tests/test_e2e_torch_zoo.py). Where the +cpu wheel is not on
# your index: make zoo TORCH_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=
zoo: install
	@$(BIN)/python -m pip install -qq $(TORCH_PIP_ARGS) '$(TORCH)' onnxscript || { \
	  echo "make zoo: could not install $(TORCH) and onnxscript into $(VENV) (see pip's" \
	       "error above); set TORCH=... or TORCH_PIP_ARGS=... and try again" >&2; exit 1; }
	$(BIN)/python -m pytest -q tests/test_e2e_torch_zoo.py

# Triton's perf_analyzer against mserve over HTTP and gRPC (bench/perf_analyzer.py; options in
# PA_ARGS). It ships in the tritonclient 2.45 wheel, installed into its own venv $(PA_VENV) so
# the project keeps its newer tritonclient, with nvidia-cuda-runtime-cu12 (it loads libcudart
# even on CPU); it also needs Debian's libb64-0d (apt-get install libb64-0d).
PA_VENV ?= .venv-pa
PA_TRITONCLIENT ?= tritonclient==2.45.0
perf-analyzer: install perf-analyzer-tools
	$(BIN)/python bench/perf_analyzer.py --venv $(PA_VENV) $(PA_ARGS)

perf-analyzer-tools: $(PA_VENV)/bin/perf_analyzer
	@ldconfig -p | grep -q 'libb64\.so\.0d' || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null \
	  && { apt-get install -y -qq libb64-0d >/dev/null 2>&1 \
	       || { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }; }; } \
	  || { echo "perf_analyzer needs Debian's libb64-0d: apt-get install libb64-0d" >&2; exit 1; }

$(PA_VENV)/bin/perf_analyzer:
	$(PYTHON) -m venv $(PA_VENV)
	echo '*' > $(PA_VENV)/.gitignore
	$(PA_VENV)/bin/python -m pip install -qq '$(PA_TRITONCLIENT)' nvidia-cuda-runtime-cu12
	@test -x $@ || { echo "make perf-analyzer: $(PA_TRITONCLIENT) installed no $@" >&2; exit 1; }

# The serving image (Dockerfile) with whichever of podman, docker or buildah is installed
# (CONTAINER=... chooses), tagged $(IMAGE). It pulls only its one base, BASE (default the
# Dockerfile's python:3.12-slim-bookworm); a BASE already in the local store builds with no
# registry at all (podman/buildah: IMAGE_ARGS=--pull=never). GPU image:
#   make image VARIANT=gpu IMAGE=mserve:dev-gpu   (CUDA and cuDNN come as wheels)
# Where no registry can be reached at all, `make image-offline` builds the same Dockerfile with
# $(CONTAINER_IMAGE_TOOL) (podman, on a Debian base made locally with mmdebstrap; root).
IMAGE ?= mserve:dev
BASE ?=
VARIANT ?= cpu
IMAGE_ARGS ?=
CONTAINER ?= $(firstword $(foreach tool,podman docker buildah,$(shell command -v $(tool))))
CONTAINER_IMAGE_TOOL ?= ../shared/tools/container-image
IMAGE_BUILD_ARGS = $(if $(BASE),--build-arg BASE=$(BASE)) --build-arg VARIANT=$(VARIANT)

image:
	@test -n "$(CONTAINER)" || { echo "make image: no podman, docker or buildah found:" \
	  "install one, or name it with CONTAINER=..." >&2; exit 1; }
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) $(IMAGE_ARGS) -t $(IMAGE) .

image-offline:
	@test -x "$(CONTAINER_IMAGE_TOOL)" || { echo "make image-offline: $(CONTAINER_IMAGE_TOOL)" \
	  "not found (CONTAINER_IMAGE_TOOL=...); on a machine that reaches a registry:" \
	  "make image" >&2; exit 1; }
	$(CONTAINER_IMAGE_TOOL) build -t $(IMAGE) $(IMAGE_BUILD_ARGS) . \
	  $(if $(IMAGE_ARGS),-- $(IMAGE_ARGS))

completions: install
	$(BIN)/python completions/generate.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
