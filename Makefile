# Two commands a new user needs: `make demo` and `make test`. `make docs` builds the documentation site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_TORCH := torch==2.14.1 torchvision==0.29.1
# Where pip takes torch from when .venv has none, e.g. the CPU-only build:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# e.g. --system-site-packages: let .venv see a torch installed outside it (then kept, not reinstalled)
VENV_FLAGS ?=

.PHONY: demo test lint docs env clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to what pip can take from this machine's disk, unless .venv
	# already has them (e.g. the CPU build installed by hand, README "Quick start"): kept as they are
	$(PY) -c 'import torch, torchvision' 2>/dev/null && echo "make: keeping the torch already in $(VENV)" || \
		$(PY) -m pip install -q $(PIP_TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
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

# The documentation site (mkdocs.yml): installs the `docs` extra into .venv when it is missing, then
# builds with --strict (any warning fails) into site/. Needs no network once installed.
docs: env
	$(PY) -c 'import mkdocs, material, mkdocstrings_handlers.python' 2>/dev/null || \
		$(PY) -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache site docs/generated
