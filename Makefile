# Everything runs from the project's own virtualenv; `make test` and `make serve` create it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install models tools front-door peers test triton serve demo bench lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "Installing the project and its dependencies into $(VENV) (first time: about 2-3 minutes; then skipped until pyproject.toml changes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Small random-weight demo models, built offline; skipped for what is already there.
models: $(STAMP)
	@echo "Demo models (random weights) for models/demo and model_repository/nsfw/1 (first time: about 30 s; then skipped)"
	@$(BIN)/python -m export.demo_models

# promtool, prometheus, docker-compose, chromium and nginx for the tests: apt-get as root when
# missing.
# checkov in a virtualenv of its own: its exact pins would downgrade the project's packages.
CHECKOV := $(VENV)/tools/checkov/bin/checkov
tools: $(CHECKOV)
	sh deploy/install-tools.sh

$(CHECKOV): tests/deploy/checkov-requirements.txt
	@echo "checkov for the Kubernetes checks, in $(VENV)/tools/checkov (first time: about a minute)"
	$(PYTHON) -m venv --clear $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/python -m pip install --quiet -r tests/deploy/checkov-requirements.txt
	touch $@

test: models tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

triton: models
	$(BIN)/python -m embedded.triton

# nginx, the gateway's front door (docs/security.md), and Redis, the jobs' store and queue
# (docs/jobs.md): Debian's nginx-light and redis-server, as root when missing.
front-door:
	sh deploy/install-tools.sh nginx redis-server

serve: models front-door
	$(BIN)/python -m embedded.stack

demo: $(STAMP)
	$(BIN)/python -m embedded.demo

# LitServe, Ray Serve and BentoML for benchmarks/peers, in a virtualenv of their own
# (.venv/peers, reusing .venv's torch; about a minute the first time): never the service's.
peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers.env

# Benchmarks (not in `make test`; a smoke run of each is): ends with the summary lines.
bench: models front-door peers
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The documentation site (docs/, mkdocs.yml) on http://127.0.0.1:8010, rebuilt on every save.
docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf .run models model_repository/nsfw/1/*.onnx model_repository/nsfw/1/*.xml \
		model_repository/nsfw/1/*.bin model_repository/nsfw/1/nsfw.json
