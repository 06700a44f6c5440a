# interest-stream: the two commands are `make demo` and `make test`; both set everything up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_LIBS := .deps/kafka/libs
KAFKA_STAMP := .deps/kafka/.installed

.PHONY: setup system-deps services-up services-down demo test test-fast lint format model bench clean

setup: $(STAMP) $(KAFKA_STAMP)

# apt packages the tests and the demo need: redis-server, kcat, a Java runtime and Maven (Apache Kafka's broker runs
# from Maven Central's jars), docker-compose (only to validate the compose file; no Docker engine runs here), and
# python3-venv where Debian's python3 lacks venv's ensurepip. Skipped when there.
system-deps:
	@missing=""; command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v kcat >/dev/null 2>&1 || missing="$$missing kcat"; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	$(PY) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then echo "installing (apt):$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# Apache Kafka's broker: the jars deps/kafka/pom.xml pins, from Maven Central (Maven checks their checksums).
$(KAFKA_STAMP): deps/kafka/pom.xml | system-deps
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f deps/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS)
	@touch $(KAFKA_STAMP)

# torch first, pinned, from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build; training and export
# need no GPU, and ONNX Runtime brings its own CUDA provider); plain PyPI if that index cannot be reached.
$(STAMP): pyproject.toml | system-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
	  || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)
	@echo "ready: $(BIN)/interest-stream"

services-up: setup
	$(BIN)/interest-stream services up

services-down:
	@test -x $(BIN)/interest-stream && $(BIN)/interest-stream services down || true

demo: setup
	$(BIN)/interest-stream demo

test: setup
	$(BIN)/python -m pytest -q

# everything but the fault suite (for a quick loop while developing)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not faults"

model: setup
	$(BIN)/python -c "from export.onnx_export import build_default_model as b; print(b())"

bench: setup
	$(BIN)/interest-stream bench --out artifacts/bench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: services-down
	rm -rf .run artifacts .pytest_cache .ruff_cache .deps
