# Everything a fresh Debian 12 machine needs, in two commands:
#   make demo   - a FineTuneJob end to end on a real local control plane (CPU, tiny model)
#   make test   - the test suite (unit + end-to-end against the real local control plane)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kubesloth-installed

.PHONY: setup controlplane demo test test-unit image-operator image-trainer test-images crd clean

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

# The CUDA trainer image, the same way: exactly requirements/trainer.lock (CUDA 13.0 torch + NVIDIA runtime wheels,
# unsloth 2026.10.9) on a Debian base with Python 3.11 and gcc. Tagged as the chart's default trainer image
# (ghcr.io/kubesloth/trainer:<appVersion>, a placeholder: push it where your cluster pulls from). ~6 min, 6.8 GB.
image-trainer:
	bash hack/build-trainer-image.sh

# Only the image tests (`make test` runs them too): both images built, the trainer image run against that build.
test-images: setup image-trainer
	KUBESLOTH_TRAINER_IMAGE=$$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/ghcr.io\/kubesloth\/trainer:\1/p' \
	  charts/kubesloth/Chart.yaml) $(BIN)/pytest -q -m image tests/chart/test_operator_image.py tests/chart/test_trainer_image.py

crd: setup
	$(BIN)/kubesloth crd --write

clean:
	-$(BIN)/kubesloth dev cluster down
	rm -rf .kubesloth
