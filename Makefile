# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A pinned torch first: a bare or ranged requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: run test bench fmt lint clean chromium

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/qianwen run

# The web chat page is tested in headless Chromium: Debian's package, installed when missing and apt is usable.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no chromium and no root apt-get; the web page test will be skipped (apt install chromium)"

test: $(VENV)/.installed-dev chromium
	$(VENV)/bin/ruff check qianwen tests benchmarks
	$(VENV)/bin/ruff format --check qianwen tests benchmarks
	$(PY) -m pytest

bench: $(VENV)/.installed-dev
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m benchmarks.run_all

fmt: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format qianwen tests benchmarks
	$(VENV)/bin/ruff check --fix qianwen tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
