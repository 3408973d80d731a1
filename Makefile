# mobiserve developer entry points. `make serve` and `make test` are the README's quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# A local folder holding the zoo's files, used instead of the network when present (sha256 still checked).
MODEL_MIRROR ?= $(wildcard $(SHARED)/models)
export MOBISERVE_MODEL_MIRROR ?= $(MODEL_MIRROR)
PYTEST_ARGS ?=

.PHONY: setup serve models test test-fast lint check-protos protos bench clean dist

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

serve: setup ## set up, then serve the default model (int8) on 127.0.0.1:50051, pulling it if missing
	$(BIN)/mobiserve serve

models: setup ## download the zoo's models into ./models, checked by sha256
	$(BIN)/mobiserve models pull

test: setup ## the whole test suite (reads models and images from ../shared)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup ## the quick loop: every test but those marked slow (well under a minute)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup ## the gate CI runs: ruff (lint, format check), the import-layer contracts, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	BIN=$(abspath $(BIN)) scripts/check-package.sh

protos: setup ## regenerate the gRPC stubs and their type stubs
	PYTHON=$(BIN)/python scripts/gen-protos.sh

# `make bench`: a representative sweep of the int8 model served with its defaults, beside the
# in-process references and an unbatched server; a few minutes. Override BENCH_ARGS for others.
BENCH_MODEL ?= $(wildcard $(SHARED)/models/mobilenetv2-12-int8.onnx)
BENCH_IMAGES ?= $(SHARED)/data/imagenet-sample
BENCH_ARGS ?= --concurrency 1,8,32,64 --duration 10 --baseline --compare-unbatched

bench: setup ## measure throughput and latency; the report goes to reports/bench-<time>/ (not committed)
	$(BIN)/mobiserve bench --serve="$(if $(BENCH_MODEL),--model $(BENCH_MODEL))" --images $(BENCH_IMAGES) \
		$(BENCH_ARGS) --output reports/bench-$$(date +%Y%m%d-%H%M%S)

# `make dist`: the wheel, to install where the sources are not (README, Installing):
# pip install dist/mobiserve-<version>-py3-none-any.whl (the client) or '...whl[server]' (the server).
DIST ?= dist

dist: setup ## build the wheel into $(DIST)/
	rm -f $(DIST)/mobiserve-*.whl
	$(BIN)/pip wheel --no-deps --quiet -w $(DIST) .
	@ls $(DIST)/mobiserve-*.whl

check-protos: protos ## fail if the committed stubs differ from the .proto
	git diff --exit-code -- protos/

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache

# `make image`: the container image (deploy/Dockerfile, docs/deploy.md), where a Docker engine
# with BuildKit runs. The models are baked from $(SHARED)/models when that folder exists (sha256
# still checked), else pulled from the zoo during the build.
IMAGE ?= mobiserve:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: image
image: ## build the container image $(IMAGE)
	docker build -f deploy/Dockerfile -t $(IMAGE)$(if $(MODEL_MIRROR), --build-context model-mirror=$(MODEL_MIRROR)) .
