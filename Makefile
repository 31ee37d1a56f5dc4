# The two set-up commands: `make serve` (build the demo model if missing, then serve it) and
# `make test` (lint, types, tests). Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= models/demo.onnx
HOST ?= 127.0.0.1
PORT ?= 8000
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: serve demo test lint install-serve install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The checkout's folders are importable by their own names too (`import model.config`, the same
# module as `mmoe.model.config`), from anywhere in this development environment.
$(VENV)/.train-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[serve,train]"
	$(BIN)/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'mmoe-checkout.pth').write_text('$(CURDIR)\n')"
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.train-installed
	$(PIP) install -e ".[serve,train,dev]"
	touch $@

demo: $(MODEL)

$(MODEL): configs/demo.yaml | $(VENV)/.train-installed
	$(BIN)/mmoe data synthetic-ranking --rows 200000 --seed 7 --out data/demo.parquet
	$(BIN)/mmoe train --config configs/demo.yaml --data data/demo.parquet --out runs/demo --overwrite
	$(BIN)/mmoe export runs/demo --out $(MODEL)

serve: $(VENV)/.train-installed $(MODEL)
	$(BIN)/mmoe serve --model $(MODEL) --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mmoe

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data models results
