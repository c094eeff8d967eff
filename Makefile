# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install everything on first use; `make setup` does only that.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch guesses the CUDA toolkit from the `nvcc` on PATH, which may be a wrapper: point it at the real one.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
export MAX_JOBS ?= 2

.PHONY: setup test demo quickstart bench clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import pm_kernels; print(pm_kernels.backends())"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/pm-kernels demo

quickstart: $(STAMP)
	$(PY) python/quickstart.py

bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info pm_kernels/_C*.so
