# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_HOME ?= $(CURDIR)/.mserve-demo

.PHONY: demo test install clean demo-stop completions bench soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -qq -e '.[test]'

# Deploy the example iris classifier, predict, list. State lives in .mserve-demo/
# (MSERVE_HOME); stop the daemon with `make demo-stop`.
demo: install
	@export MSERVE_HOME=$(DEMO_HOME); set -e; \
	$(BIN)/mserve daemon start; \
	$(BIN)/mserve deploy examples/iris/model.onnx --name iris; \
	echo; echo '$$ mserve predict iris examples/iris/input.json'; \
	$(BIN)/mserve predict iris examples/iris/input.json; \
	echo; echo '$$ mserve list'; \
	$(BIN)/mserve list; \
	echo; echo "Try: MSERVE_HOME=$(DEMO_HOME) $(BIN)/mserve --help   (stop it: make demo-stop)"

demo-stop:
	MSERVE_HOME=$(DEMO_HOME) $(BIN)/mserve daemon stop

test: install
	$(BIN)/python -m pytest -q

# Benchmarks against a FastAPI baseline and KServe, measured in one run (docs/benchmarks.md).
bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Mixed good/bad load, deploys, rollbacks and a worker kill (docs/reliability.md).
soak: install
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

completions: install
	$(BIN)/python completions/generate.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
