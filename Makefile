# `make demo`, `make test` and `make docs` work on a fresh machine: they create or update .venv themselves,
# saying what they install before each (quiet) pip step. The demo needs only the package; the tests and the
# docs add their extras on top of it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peering-installed
DEV_STAMP := $(VENV)/.peering-dev-installed
DOCS_STAMP := $(VENV)/.peering-docs-installed
# The CPU build of torch must go in first: a bare `torch` requirement would pull CUDA wheels.
TORCH_PIN ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet

.PHONY: test demo docs bench lint clean

$(STAMP): pyproject.toml
	@echo "make: setting up $(VENV) for peering: 3 steps, about 2 minutes the first time (later runs skip them)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make: [1/3] pip itself (a few seconds)"
	@$(PIP) --upgrade pip
	@echo "make: [2/3] PyTorch, CPU build ($(TORCH_PIN), about 200 MB to download: about a minute)"
	@$(PIP) $(TORCH_PIN)
	@echo "make: [3/3] peering and what it needs: Lightning, TensorBoard, matplotlib, scikit-learn, ... (about 30 s)"
	@$(PIP) -e .
	@touch $(STAMP)
	@echo "make: $(VENV) is ready"

# What the tests and `make lint` add: pytest, hypothesis, ruff, mypy, import-linter, transformers (tiny models
# built from configs; nothing is downloaded at test time).
$(DEV_STAMP): $(STAMP)
	@echo "make: adding the test tools to $(VENV): pytest, hypothesis, ruff, mypy, transformers, ... (about 30 s)"
	@$(PIP) -e '.[dev]'
	@touch $(DEV_STAMP)

$(DOCS_STAMP): $(STAMP)
	@echo "make: adding MkDocs, Material and mkdocstrings to $(VENV) (about 15 s)"
	@$(PIP) -e '.[docs]'
	@touch $(DOCS_STAMP)

# The whole suite takes about 8 minutes on 2 idle cores; tests that need MNIST are skipped without
# PEERING_DATA_DIR (the summary at the end says how many, and how to get it).
test: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/peering demo $(DEMO_ARGS)

# The documentation site (docs/, mkdocs.yml; the API pages come from the docstrings) into site/.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict $(MKDOCS_ARGS)

# Benchmarks compare against Captum and torchattacks. torchattacks hard-requires torchvision, which has no
# CPU build here, so it is installed without its dependencies (the attacks used need only torch).
bench: $(STAMP)
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps torchattacks
	$(PY) benchmarks/bench_explain.py
	$(PY) benchmarks/bench_morph.py
	$(PY) benchmarks/bench_morph_judges.py
	$(PY) benchmarks/bench_callback.py
	$(PY) benchmarks/bench_faithfulness.py
	$(PY) benchmarks/bench_text_morph.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
