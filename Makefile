# interest-stream: the two commands are `make demo` and `make test`; both set everything up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_LIBS := .deps/kafka/libs
KAFKA_STAMP := .deps/kafka/.installed

.PHONY: setup system-deps services-up services-down demo test test-fast test-slim lint format model bench clean

setup: $(STAMP) $(KAFKA_STAMP) test-clients

# apt packages the tests and the demo need: redis-server, kcat, a JDK and Maven (Apache Kafka's broker runs from Maven
# Central's jars; javac builds the test's Java producer), npm (the kafkajs test producer), docker-compose (only to validate the compose file; no Docker engine runs here), and
# python3-venv where Debian's python3 lacks venv's ensurepip. Skipped when there.
system-deps:
	@missing=""; command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v kcat >/dev/null 2>&1 || missing="$$missing kcat"; \
	command -v javac >/dev/null 2>&1 || missing="$$missing openjdk-17-jdk-headless"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
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

# The conformance tests' producers (tests/system/test_conformance.py): Apache Kafka's Java client (Maven Central,
# checksums checked; FileProducer.java compiled into .deps/clients/java/classes) and kafkajs (npm ci from the committed
# package-lock.json). Each reruns only when its inputs change.
CLIENTS_JAVA := .deps/clients/java
CLIENTS_JAVA_STAMP := $(CLIENTS_JAVA)/.installed
KAFKAJS_DIR := tests/clients/kafkajs
KAFKAJS_STAMP := $(KAFKAJS_DIR)/node_modules/.installed

.PHONY: test-clients
test-clients: $(CLIENTS_JAVA_STAMP) $(KAFKAJS_STAMP)

$(CLIENTS_JAVA_STAMP): tests/clients/java/pom.xml tests/clients/java/FileProducer.java | system-deps
	rm -rf $(CLIENTS_JAVA)
	mvn -q -B -f tests/clients/java/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(CLIENTS_JAVA)
	javac -d $(CLIENTS_JAVA)/classes -cp '$(CLIENTS_JAVA)/*' tests/clients/java/FileProducer.java
	@touch $(CLIENTS_JAVA_STAMP)

$(KAFKAJS_STAMP): $(KAFKAJS_DIR)/package.json $(KAFKAJS_DIR)/package-lock.json | system-deps
	npm ci --prefix $(KAFKAJS_DIR) --no-audit --no-fund
	@touch $(KAFKAJS_STAMP)

# torch first, pinned, from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build; training and export
# need no GPU, and ONNX Runtime brings its own CUDA provider); plain PyPI if that index cannot be reached. The wheels
# are kept in a folder of the machine's (WHEELS), so every clone on it (CI's included) downloads torch once.
WHEELS ?= $(HOME)/.cache/interest-stream/wheels
TORCH := torch==2.13.0
$(STAMP): pyproject.toml | system-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@mkdir -p $(WHEELS)
	$(BIN)/python -m pip install -q --no-index --find-links $(WHEELS) $(TORCH) 2>/dev/null \
	  || { { $(BIN)/python -m pip download -q -d $(WHEELS) $(TORCH) --index-url https://download.pytorch.org/whl/cpu \
	         || $(BIN)/python -m pip download -q -d $(WHEELS) $(TORCH); } \
	       && $(BIN)/python -m pip install -q --no-index --find-links $(WHEELS) $(TORCH); }
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
	$(MAKE) --no-print-directory test-slim

# The worker's own install (`pip install .`, no torch, no matplotlib) in a venv of its own, running the worker's tests
# against a model the full venv exports: proves the worker needs neither.
SLIM := .venv-slim
SLIM_MODEL := .run/slim-test-model
test-slim: setup
	@test -x $(SLIM)/bin/python || $(PY) -m venv $(SLIM)
	$(SLIM)/bin/python -m pip install -q . pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.17 "psutil>=5.9,<8"
	@$(SLIM)/bin/python -c 'import importlib.util as u, sys; sys.exit("torch is installed in $(SLIM)" if u.find_spec("torch") or u.find_spec("matplotlib") else 0)'
	$(BIN)/python -c "from export.onnx_export import build_default_model as b; b('$(SLIM_MODEL)', fast=True)" >/dev/null
	INTEREST_TEST_MODEL=$(CURDIR)/$(SLIM_MODEL)/model.onnx $(SLIM)/bin/python -m pytest -q -p no:cacheprovider \
	  tests/streams/core/test_events.py tests/streams/core/test_processor.py tests/streams/runtime/test_stepper.py tests/streams/runtime/test_worker.py

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
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: services-down
	rm -rf .run artifacts .pytest_cache .ruff_cache .deps $(SLIM)
