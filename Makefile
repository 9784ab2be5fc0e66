# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   a tiny GPT meets a bad batch: spike, guard, pause, dump, rewind, resume, report (< 2 min)
#   make test   lint and the whole test suite (installs Debian's prometheus for the real-server tests)
#
# torch is installed first and pinned, so that nothing later pulls a multi-GB CUDA build.
# Elsewhere, point TORCH at the build you want, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench prometheus clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/runwatch demo

prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed prometheus lint
	$(PY) -m pytest -q -rs --durations=15 -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) build dist *.egg-info
