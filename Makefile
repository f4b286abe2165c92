# Two commands do everything on a fresh machine: `make demo` (set up + run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
PORT ?= 7860
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast app lab bench chromium clean

setup: $(VENV)/.installed

# torch/torchvision first and alone: this pair installs from local files (see README, "Installing").
$(VENV)/.installed: pyproject.toml scripts/install-extras.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[app,notebooks,dev]"
	PIP="$(BIN)/pip" bash scripts/install-extras.sh
	touch $@

demo: setup
	$(BIN)/vlmtk demo --preset embedded

test: setup chromium
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

app: setup
	$(BIN)/python -m app.app --run-dir $(RUN) --port $(PORT)

# The notebook opens $(RUN) through TOOLKIT_RUN_DIR (absolute: its kernel runs in notebooks/).
lab: setup
	TOOLKIT_RUN_DIR=$(abspath $(RUN)) $(BIN)/jupyter lab notebooks/

bench: setup
	$(BIN)/python benchmarks/bench_ss2d.py

# Browser tests and PNG export drive Debian's chromium (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

clean:
	rm -rf $(VENV) runs data_cache
