# The two commands a new user runs (see README.md): `make demo` and `make test`.
# Both install what they need first. torch is installed *before* hf_recover, pinned to the local CPU
# build, so that resolving hf_recover's dependencies never pulls a newer torch (and its CUDA wheels).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint

install:
	$(PIP) "torch==$(TORCH_VERSION)"
	$(PIP) -e ".[dev]"

demo: install
	$(PYTHON) -m hf_recover.cli demo $(ARGS)

test: install
	$(PYTHON) -m pytest -q --timeout=900 tests
	ruff check .
	ruff format --check .

lint:
	ruff check .
	ruff format --check .
