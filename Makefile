# `make test` and `make demo` work on a fresh machine: they create or update .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peering-installed
# The CPU build of torch must go in first: a bare `torch` requirement would pull CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/peering demo $(DEMO_ARGS)

# Benchmarks compare against Captum and torchattacks. torchattacks hard-requires torchvision, which has no
# CPU build here, so it is installed without its dependencies (the attacks used need only torch).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps torchattacks
	$(PY) benchmarks/bench_explain.py
	$(PY) benchmarks/bench_morph.py
	$(PY) benchmarks/bench_morph_judges.py
	$(PY) benchmarks/bench_callback.py
	$(PY) benchmarks/bench_faithfulness.py
	$(PY) benchmarks/bench_text_morph.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
