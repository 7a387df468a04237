# Build, lint and test entry points. Local services (Docker Engine, registry, Mosquitto) are managed by
# scripts/services.sh and live under $(LIFECYCLE_SERVICES_DIR); the venv is .venv.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export LIFECYCLE_SERVICES_DIR ?= /tmp/lifecycle-services
export DOCKER_HOST ?= unix://$(LIFECYCLE_SERVICES_DIR)/docker/docker.sock
export DOCKER_BUILDKIT := 0
# Padding of the simulated images as a share of real sizes: 1.0 is realistic (~0.65 GB for both versions),
# `make test` uses a small share so that building and pulling take seconds.
SIM_PAD_SCALE ?= 1.0
TEST_PAD_SCALE ?= 0.005
PYTEST_ARGS ?=
SIM_IMAGES_ARGS ?=  # extra builder flags, e.g. --namespace=try --versions=v1.31.4

.PHONY: venv services sim-images lint test demo clean

# venv: create .venv and install the project with its dev extras; redone only when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# services: install missing Debian packages, start dockerd/registry/mosquitto or reuse those that answer.
services:
	scripts/services.sh up

# sim-images: build the simulated node's images with padding SIM_PAD_SCALE and push them to the registry.
sim-images: venv services
	$(PY) -m simnode.images --pad-scale $(SIM_PAD_SCALE) $(SIM_IMAGES_ARGS)

# lint: ruff over everything (code, tests, benchmarks), mypy --strict over the code.
lint: venv
	$(VENV)/bin/ruff check lifecycle states simnode tests bench
	$(VENV)/bin/mypy --strict lifecycle states simnode

# test: everything the tests need, the lint, then pytest. pytest's exit code is the target's; collecting no
# test at all (pytest exit 5) fails too.
test: SIM_PAD_SCALE = $(TEST_PAD_SCALE)
test: venv services sim-images lint
	SIM_PAD_SCALE=$(SIM_PAD_SCALE) $(PY) -m pytest -q --durations=15 --ignore=tests/faults $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing"; fi; exit $$rc

# test-faults: the long runs that drive the real service from outside through faults (SIGKILL at every step
# boundary and inside steps, broker/registry/engine faults, conflicting requests, install->reset cycles with resource
# counts, hostile images, pods and exposures), kept out of `make test`'s 20 minutes (tests/faults/).
.PHONY: test-faults
# FAULT_CYCLES: install->reset cycles of tests/faults/test_cycles.py (the file alone runs 5).
FAULT_CYCLES ?= 25
# FAULT_FUZZ: fuzzed requests of tests/faults/test_fuzz_requests.py (the file alone sends 20,000).
FAULT_FUZZ ?= 100000
test-faults: SIM_PAD_SCALE = $(TEST_PAD_SCALE)
test-faults: venv services sim-images
	SIM_PAD_SCALE=$(SIM_PAD_SCALE) FAULT_CYCLES=$(FAULT_CYCLES) FAULT_FUZZ=$(FAULT_FUZZ) $(PY) -m pytest -q --durations=15 tests/faults $(PYTEST_ARGS)

# demo: install a cluster on the simulated node through the service, over MQTT (scripts/demo.sh).
demo: venv services sim-images
	@if [ ! -f scripts/demo.sh ]; then echo "demo not built yet"; exit 1; fi
	bash scripts/demo.sh

# bench: speed and memory figures with ratios against a baseline (bench/README.md); not part of `make test`.
.PHONY: bench
bench: SIM_PAD_SCALE = 1.0
bench: SIM_IMAGES_ARGS = --namespace=bench --only=desktop-kubernetes --versions=v1.31.4
bench: venv services sim-images
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# clean: caches and build leftovers; keeps .venv, the services and the images (remove those by hand).
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
