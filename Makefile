# The two set-up commands: `make serve` (build the demo model if missing, then serve it) and
# `make test` (lint, types, tests). Both create .venv and install what they need.
#
# `make serve` passes no settings of its own: `mmoe serve` reads every MMOE_* variable from the
# environment, as in a container.
#   MMOE_PORT=8011 make serve
#   MMOE_HOST=0.0.0.0 MMOE_MODEL_PATH=models/other.onnx make serve
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `mmoe serve` serves when MMOE_MODEL_PATH is unset (service/settings.py's default).
DEMO_MODEL := models/demo.onnx
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: serve demo test lint clean system-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Two distributions: the server (this directory, `.[serve]`: no torch, no training code) and the
# training code (training/: data, train, export, inspect, bench), which depends on the first.
# Both are installed editable: the packaging maps the stage folders into the mmoe namespace
# (model/ is mmoe.model, ...), so an edit takes effect without a reinstall.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[serve]"
	touch $@

$(VENV)/.train-installed: training/pyproject.toml $(VENV)/.serve-installed
	$(PIP) install -e ./training
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.train-installed
	$(PIP) install -e ".[serve,dev]"
	touch $@

demo: $(DEMO_MODEL)

$(DEMO_MODEL): configs/demo.yaml | $(VENV)/.train-installed
	$(BIN)/mmoe data synthetic-ranking --rows 200000 --seed 7 --out data/demo.parquet
	$(BIN)/mmoe train --config configs/demo.yaml --data data/demo.parquet --out runs/demo --overwrite
	$(BIN)/mmoe export runs/demo --out $@

# The demo is built only when it is what will be served.
SERVED_MODEL := $(or $(MMOE_MODEL_PATH),$(DEMO_MODEL))
serve: $(VENV)/.serve-installed $(if $(filter $(DEMO_MODEL) ./$(DEMO_MODEL),$(SERVED_MODEL)),$(DEMO_MODEL))
	$(BIN)/mmoe serve

# `make serve PORT=8011` would be silently ignored: say what works instead, before any build.
ifneq ($(filter serve,$(MAKECMDGOALS)),)
$(foreach v,PORT HOST MODEL,$(if $(filter command line,$(origin $(v))),\
  $(error make serve takes its settings from MMOE_* variables, e.g. MMOE_PORT=8011 make serve)))
endif

# mypy cannot follow an editable install's mapping of folders to package names, so it reads a
# copy of the packages laid out as a wheel installs them (mmoe/model/..., made afresh in
# build/typecheck), with the tests; its messages name the files of the checkout.
TYPECHECK := build/typecheck
lint: SHELL := /bin/bash
lint: .SHELLFLAGS := -o pipefail -c
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/mmoe
	cp mmoe/*.py $(TYPECHECK)/mmoe/
	for stage in contract service model export bench; do cp -r $$stage $(TYPECHECK)/mmoe/; done
	cp -r tests $(TYPECHECK)/
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
	  --cache-dir $(CURDIR)/.mypy_cache -p mmoe -p tests \
	  | sed -E 's#^mmoe/(contract|service|model|export|bench)/#\1/#;' 

# Programs the tests run beside the project, from Debian's packages where they are missing:
# promtool (package prometheus) checks the alert rules, redis-server is the item store of the
# Redis tests, wrk is the load generator `mmoe bench` compares with its own.
SYSTEM_TOOLS := promtool:prometheus redis-server:redis-server wrk:wrk
system-tools:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing $$missing (apt-get)"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# PYTEST_ARGS: more pytest options for both runs, e.g. make test PYTEST_ARGS="-k predict".
# The tests run on two processes (pytest-xdist: 8 minutes on 2 cores where one took 12-15),
# then the few marked `serial` (they measure time, or how connections spread over a server's
# workers) alone, so that no other test shares the cores with them. Exit status 5 is "nothing
# selected", as a -k filter may leave one run empty.
test: lint system-tools
	$(BIN)/python -m pytest -q -n 2 -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -q -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) runs data models results
