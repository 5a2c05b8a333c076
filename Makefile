# Two commands for a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make serve` installs what serving the bundled example needs; `make test` everything.
SERVE_EXTRAS ?= tensorflow,onnx
EXTRAS ?= tensorflow,onnx,clients,ui,ray,examples,experience,bench,dev
HOST ?= 127.0.0.1
PORT ?= 8000
UI_PORT ?= 8501
EXAMPLE ?= examples/cartpole
# pytest-xdist workers; the slow suites share one server per module.
WORKERS ?= 2

.PHONY: install serve ui test test-fast lint check bench soak example clean system-bench system-test

# What the suite needs from Debian's packages, as command:package; installed where missing.
# javac compiles the generated Java client in the SDK test.
TEST_TOOLS ?= prometheus:prometheus docker-compose:docker-compose chromium:chromium \
	javac:openjdk-17-jdk-headless

$(BIN)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	touch $@

$(BIN)/.stamp-serve: pyproject.toml $(BIN)/.stamp-venv
	$(BIN)/pip install --quiet -e ".[$(SERVE_EXTRAS)]"
	touch $@

$(BIN)/.stamp-install: pyproject.toml $(BIN)/.stamp-venv
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@ $(BIN)/.stamp-serve $(BIN)/.stamp-ui

install: $(BIN)/.stamp-install

serve: $(BIN)/.stamp-serve
	$(BIN)/policy-server serve $(EXAMPLE) --host $(HOST) --port $(PORT)

$(BIN)/.stamp-ui: pyproject.toml $(BIN)/.stamp-venv
	$(BIN)/pip install --quiet -e ".[ui]"
	touch $@

# The demo page, on :8501; it talks to the server `make serve` runs.
ui: $(BIN)/.stamp-ui
	$(BIN)/streamlit run frontend.py --server.port $(UI_PORT)

# ruff and mypy in seconds, in a small environment of their own (no TensorFlow, no Ray).
CHECK_VENV ?= .venv-check
$(CHECK_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECK_VENV)/bin/pip install --quiet -e ".[check]"
	touch $@

check: $(CHECK_VENV)/.stamp
	$(CHECK_VENV)/bin/ruff check .
	$(CHECK_VENV)/bin/ruff format --check .
	$(CHECK_VENV)/bin/mypy

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

system-test:
	@missing=""; for pair in $(TEST_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# The in-process tests: no server process, no browser (CONTRIBUTING.md).
FAST_TESTS ?= tests/test_layers.py tests/policy tests/loading/test_archive.py \
	tests/experience/test_records.py tests/serving/test_registry.py tests/serving/test_service.py \
	tests/serving/test_lifecycle.py tests/serving/test_batching.py tests/serving/test_requests.py \
	tests/serving/test_slow_models.py tests/serving/test_episode_store.py \
	tests/hosting/test_lazy_app.py tests/hosting/test_shared_state.py

test-fast: install
	$(BIN)/pytest -n $(WORKERS) $(FAST_TESTS)

test: install lint system-test
	$(BIN)/pytest -n $(WORKERS) --dist loadfile

# wrk and h2load (gRPC) come from Debian's packages; installed only where they are missing.
system-bench:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }

# The gRPC measurement runs its server on the tritonclient environment the tests build
# (the grpc extra would change versions in .venv).
bench: install system-bench
	BENCH_GRPC_PYTHON=$$($(BIN)/python -c 'from tests.oip import client_python; print(client_python("triton"))') \
	  $(BIN)/python bench/run.py
	$(BIN)/python bench/components.py
	$(BIN)/python bench/recurrent.py

# Minutes of mixed traffic with a reload in the middle, watching memory, descriptors and
# threads; not part of `make test`. Its figures go to bench/RESULTS.md.
soak: install system-bench
	$(BIN)/python bench/soak.py

example: install
	$(BIN)/python examples/make_cartpole.py --out $(EXAMPLE)

clean:
	rm -rf $(VENV) $(CHECK_VENV) build .pytest_cache .mypy_cache .ruff_cache
