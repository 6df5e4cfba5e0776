# Everything a fresh Debian 12 machine needs, in two commands:
#   make demo   - a FineTuneJob end to end on a real local control plane (CPU, tiny model)
#   make test   - the test suite (unit + end-to-end against the real local control plane)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kubesloth-installed

.PHONY: setup controlplane demo test test-unit image-operator crd clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk; a bare `torch` would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[operator,trainer,dev]'
	touch $(STAMP)

setup: $(STAMP)

# Builds kube-apiserver/kube-controller-manager from Debian's source once (~6 min), cached in ~/.cache/kubesloth.
controlplane:
	bash hack/build-control-plane.sh

demo: setup controlplane
	$(BIN)/kubesloth dev demo

test: setup controlplane
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m 'not cluster and not image'

# The operator image without a Docker daemon (buildah, chroot isolation, a Debian base made by mmdebstrap).
image-operator: setup
	bash hack/build-operator-image.sh

crd: setup
	$(BIN)/kubesloth crd --write

clean:
	-$(BIN)/kubesloth dev cluster down
	rm -rf .kubesloth
