# warmserve — the two set-up commands are `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
PB_DIR := serve/frontend/pb
PROTOS := $(wildcard protos/*.proto)
STAMP := $(VENV)/.installed
# Extra pip options for the environment, e.g. where PyPI's Linux torch wheel would be the CUDA
# build (several GB): PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
PIP_ARGS ?=

.PHONY: serve test venv protos lint typecheck unit integration bench bench-quick peers perf-analyzer clean

# Create the virtual environment from the project's own files when it is missing or stale.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIP_ARGS) -c $(CONSTRAINTS) -e '.[cpu,torch,dev,bench]'
	touch $(STAMP)

venv: $(STAMP) protos

# Generated stubs: made by the grpcio-tools installed next to the protobuf runtime they run on.
$(PB_DIR)/.generated: $(PROTOS) $(STAMP)
	rm -rf $(PB_DIR) && mkdir -p $(PB_DIR)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PB_DIR) --pyi_out=$(PB_DIR) \
		--grpc_python_out=$(PB_DIR) $(PROTOS)
	$(PY) scripts/fix_pb_imports.py $(PB_DIR)
	touch $(PB_DIR)/__init__.py $(PB_DIR)/.generated

protos: $(PB_DIR)/.generated

serve: venv
	$(VENV)/bin/warmserve serve

lint: venv
	$(VENV)/bin/ruff check serve tests benchmarks scripts
	$(VENV)/bin/ruff format --check serve tests benchmarks scripts

typecheck: venv
	$(VENV)/bin/mypy serve benchmarks

unit: venv
	$(PY) -m pytest -q tests/unit

integration: venv
	$(PY) -m pytest -q tests/integration

test: venv lint typecheck deploy-check
	$(PY) -m pytest -q -ra

# --- deployment (deploy/README.md) -------------------------------------------------------------
.PHONY: deploy-check image-tag image
BUNDLES_DIR ?= build/bundles
IMAGE_REPO ?= registry.example.com/ml/warmserve
BASE_IMAGE ?=
TAG_ARGS := $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))
DEPLOY_OUT := build/deploy

# Offline: render the example overlay (kubectl kustomize; deploy/render.py when kubectl is
# missing) into build/deploy/, validate every object strictly against Kubernetes 1.27 and the
# newest schemas and cross-check it against the server's config (tests/unit/test_deploy.py),
# test the image tag, lint the Dockerfile and the deploy scripts.
deploy-check: venv
	mkdir -p $(DEPLOY_OUT)
	$(PY) deploy/render.py deploy/k8s/overlays/example > $(DEPLOY_OUT)/example.yaml
	$(PY) -m pytest -q tests/unit/test_deploy.py tests/unit/test_image_tag.py
	$(VENV)/bin/hadolint --config deploy/.hadolint.yaml deploy/Dockerfile
	$(VENV)/bin/ruff check deploy
	$(VENV)/bin/ruff format --check deploy

# The model folders baked into the image: the demo models unless BUNDLES_DIR names others.
build/bundles: | venv
	$(VENV)/bin/warmserve demo $@ >&2

# The immutable tag for BUNDLES_DIR and this source tree: `make -s image-tag`.
image-tag: venv $(BUNDLES_DIR)
	@$(PY) deploy/image_tag.py $(TAG_ARGS) $(BUNDLES_DIR)

# Prints the docker build command for that tag; it does not run it (no Docker engine here).
image: venv $(BUNDLES_DIR)
	@$(PY) deploy/image_tag.py --docker-build --repo $(IMAGE_REPO) $(TAG_ARGS) $(BUNDLES_DIR)

perf-analyzer:
	bash benchmarks/install_perf_analyzer.sh

# The peers (MLServer, PyTriton, Ray Serve), each in its own venv under benchmarks/.peers/
# (idempotent: seconds when they are installed). One that fails to install is reported and left
# out of the comparison; the others are measured.
peers:
	bash benchmarks/peers/setup.sh || echo "make peers: some peers did not install (see above); make bench compares the others"

# warmserve against the in-process floor server and the peers: tables, JSON and plots in
# benchmarks/out/.
bench: venv perf-analyzer peers
	$(PY) -m benchmarks.compare
	$(PY) -m benchmarks.perf_analyzer_run --model mlp_onnx --concurrency 1 4 16

# Under a minute, for CI logs: the c=1 p50 and c=16 throughput ratios to the floor (printed only).
bench-quick: venv
	$(PY) -m benchmarks.compare --quick

clean:
	rm -rf $(VENV) $(PB_DIR) .pytest_cache .mypy_cache .ruff_cache
