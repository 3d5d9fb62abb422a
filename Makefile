# Two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to what pip can take from this machine's disk
	$(PY) -m pip install -q $(PIP_TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/semiseg demo

test: env
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -rs

lint: env
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
