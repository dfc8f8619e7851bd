# One command sets up and runs each job; each creates .venv and installs what it needs.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch/torchvision: these releases install from local disk on the project machines
# (x86_64, Python 3.11); override TORCH elsewhere, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
QUIET := sed '/^WARNING: Location/d'   # pip's notes about local package folders

.PHONY: setup browser demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) 2>&1 | $(QUIET)
	$(PY) -m pip install -q -e '.[test]' 2>&1 | $(QUIET)
	$(PY) -c "import clip_interpret, torch, open_clip"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/clip-interpret demo

# Debian's chromium for the web app's browser test (playwright drives it; no browser is downloaded)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/decompose.py
	$(PY) bench/textspan.py
	$(PY) bench/index.py
	$(PY) bench/toy_card.py
	$(PY) bench/study.py
	$(PY) bench/analyses.py
	$(PY) bench/app_memory.py
	$(PY) bench/pipeline.py
	$(PY) bench/gpu.py   # on a CPU: a quick check of the script; its figures are for GPUs
	$(PY) bench/scale.py
	$(PY) bench/startup.py

clean:
	rm -rf $(VENV) out
