# histoloop — two commands on a fresh machine with Python 3.11:
#   make demo   set everything up and run the main job on the embedded default
#   make test   set up the test extras and run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROTOS := $(wildcard protos/histoloop/v1/*.proto)
STUBS := services/common/histoloop/v1/common_pb2.py

.PHONY: setup setup-test deb-tools protos demo serve test lint clean

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

$(STUBS): $(PROTOS) tools/gen_protos.py | $(VENV)/.base
	$(PY) tools/gen_protos.py

setup: $(VENV)/.base $(STUBS)
setup-test: $(VENV)/.test $(STUBS) deb-tools

protos: $(VENV)/.base
	$(PY) tools/gen_protos.py

demo: setup
	$(VENV)/bin/histoloop demo

serve: setup
	$(VENV)/bin/histoloop serve

test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services/common/histoloop
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .histoloop services/common/histoloop/v1/*_pb2*.py*
