# Quick start: `make demo` runs the main job on the bundled sample study and model;
# `make test` runs the whole test suite.  Both create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Tests that draw napari need a display: use xvfb-run when present (QT_QPA_PLATFORM=xcb, since
# `offscreen` has no OpenGL); without it, GUI tests skip themselves.
XVFB := $(shell command -v xvfb-run 2>/dev/null)
ifneq ($(XVFB),)
RUN_DISPLAY := xvfb-run -a -s "-screen 0 1600x1000x24" env QT_QPA_PLATFORM=xcb
else
RUN_DISPLAY := env QT_QPA_PLATFORM=offscreen
endif

.PHONY: demo test lint format benchmarks screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU PyTorch unless a torch (e.g. a CUDA build installed beforehand) is already present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spineseg demo --output-dir demo-output

test: $(STAMP)
	$(RUN_DISPLAY) $(PY) -m pytest -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

benchmarks: $(STAMP)
	$(PY) benchmarks/run.py

screenshots: $(STAMP)
	$(RUN_DISPLAY) $(PY) scripts/screenshots.py

clean:
	rm -rf $(VENV) build dist demo-output src/*.egg-info
