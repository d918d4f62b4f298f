# histoloop — two commands on a fresh machine with Python 3.11:
#   make demo   set everything up and run the main job on the embedded default
#   make test   set up the test extras and run the whole suite
# also: make test-unit (unit tier only: no PostgreSQL, no servers), make bench (every
# benchmark in its --quick mode, with the comparison library installed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROTOS := $(wildcard protos/histoloop/v1/*.proto)
STUBS := services/common/histoloop/v1/common_pb2.py

.PHONY: setup setup-test setup-bench deb-tools protos demo serve test test-unit bench lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# torch first, pinned to the CPU build, so no dependency can pull a CUDA build; the stubs
# are generated after every install, by the grpcio-tools resolved with that protobuf
$(VENV)/.base: $(VENV)/bin/python pyproject.toml
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e .
	$(PY) tools/gen_protos.py
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -e ".[test]"
	$(PY) tools/gen_protos.py
	touch $@

# Debian tools some deployment checks use (docker-compose config, promtool) and the browser
# the workspace tests drive (chromium); installed
# where we are root with apt, else those checks skip and say why.
deb-tools:
	@if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose prometheus >/dev/null; \
	  fi; \
	fi
	@# the browser tests drive Debian's chromium with Playwright (never a downloaded browser)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  fi; \
	fi

# scikit-activeml with --no-deps: its own requirements must not move numpy, scikit-learn or torch
$(VENV)/.bench: $(VENV)/.test pyproject.toml
	$(PIP) install -e ".[bench]"
	$(PIP) install --no-deps "scikit-activeml==0.6.2"
	$(PY) tools/gen_protos.py
	touch $@

$(STUBS): $(PROTOS) tools/gen_protos.py | $(VENV)/.base
	$(PY) tools/gen_protos.py

setup: $(VENV)/.base $(STUBS)
setup-test: $(VENV)/.test $(STUBS) deb-tools
setup-bench: $(VENV)/.bench $(STUBS)

protos: $(VENV)/.base
	$(PY) tools/gen_protos.py

demo: setup
	$(VENV)/bin/histoloop demo

serve: setup
	$(VENV)/bin/histoloop serve

test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services
	$(PY) -m pytest -q -p no:cacheprovider

# the unit tier: in-process tests only (no PostgreSQL, no servers, no child processes)
test-unit: setup-test
	$(PY) -m pytest -q -p no:cacheprovider -m unit

# every benchmark in its --quick mode (checks that they run; the figures in
# benchmarks/README.md come from the full runs named there)
bench: setup-bench
	@for b in benchmarks/bench_*.py; do echo "== $$b --quick"; $(PY) $$b --quick || exit 1; done
	@echo "== benchmarks/bench_simulation.py --sample her2st-a1 --quick"
	@$(PY) benchmarks/bench_simulation.py --sample her2st-a1 --quick

clean:
	rm -rf $(VENV) .histoloop services/common/histoloop/v1/*_pb2*.py*
