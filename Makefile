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

.PHONY: setup test test-triton-compat test-timm dist check-dist demo quickstart bench clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import pm_kernels; print(pm_kernels.backends())"
	touch $(STAMP)

# Two pytest workers, one file each at a time (a file's module fixtures run once), one torch thread each:
# the CI machine has 2 cores. `python -m pytest tests -q` runs the same tests in one process.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile

# timm's own tests/test_models.py (the installed timm's sdist, downloaded; not vendored) on one pm_* model per family;
# `$(PY) tests/timm_suite.py --all-models` runs every pm_* model.
test-timm: $(STAMP)
	$(PY) tests/timm_suite.py

# The GPU machines run an older triton (3.6) than .venv (3.8). A second venv sees .venv's packages (through a
# .pth file) but imports its own triton, plus numpy < 2.3 (triton 3.6's interpreter converts 1-element arrays to
# int, which newer numpy refuses), and runs the Triton tests: interpreter and sm_90 compilation. The `slow` cases
# (the same kernels at N = 577 / 785 on the interpreter) run on .venv's triton only (`make test`): CI time.
COMPAT_TRITON ?= 3.6.0
COMPAT_VENV   := .venv-triton-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed
TRITON_TESTS  := tests/ops/test_attention.py tests/ops/test_attention_bias.py tests/ops/test_token_ops.py tests/ops/test_backends.py tests/ops/test_triton_compile.py
PURELIB       := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(COMPAT_STAMP): $(STAMP)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps triton==$(COMPAT_TRITON) "numpy<2.3"
	$(PY) -c '$(PURELIB)' > "$$($(COMPAT_VENV)/bin/python -c '$(PURELIB)')/zz_main_venv.pth"
	touch $@

test-triton-compat: $(COMPAT_STAMP)
	cd $(CURDIR) && PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -c \
	    "import triton, pm_kernels; assert triton.__version__ == '$(COMPAT_TRITON)', triton.__version__; print('triton', triton.__version__)"
	OMP_NUM_THREADS=1 PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest $(TRITON_TESTS) -q -p no:cacheprovider \
	    -n 2 --dist loadfile -m "not slow" -W "ignore:Conversion of an array with ndim:DeprecationWarning"

# Release artefacts: the sdist, then a wheel built from the unpacked sdist, against .venv's torch (build isolation
# off: an isolated build would install another torch). PM_KERNELS_REQUIRE_EXT=1: no wheel without pm_kernels._C.
dist: $(STAMP)
	rm -rf dist *.egg-info   # setuptools adds the files of a stale egg-info's SOURCES.txt: a clean file list
	PM_KERNELS_REQUIRE_EXT=1 $(PY) -m build --no-isolation --outdir dist .

# The sdist's file list; the wheel (and a CPU-only wheel from the same sdist) installed into a fresh venv that
# has .venv's pinned torch but not this checkout: pm_kernels._C loads, `pm-kernels --help` runs (.ci/check_dist.sh).
check-dist: dist
	PY=$(PY) .ci/check_dist.sh

# The digits demo; its results.json (rows, the README's Markdown table, environment) and pictures go to runs/demo.
demo: $(STAMP)
	$(VENV)/bin/pm-kernels demo

# DeiT-S on random data: tokens per layer, MACs, and images/s of dense vs the deployable PM model, interleaved.
quickstart: $(STAMP)
	$(PY) python/quickstart.py --out runs/quickstart.json

# pytest-benchmark: on a CPU the extension's C++ token ops vs the torch reference and dense vs PM model forwards
# (the GPU cases are skipped without CUDA). Each run is saved under bench/results/benchmarks/<machine>/;
# `$(PY) -m pytest bench --benchmark-only --benchmark-storage=bench/results/benchmarks --benchmark-compare`
# compares a new run with the last saved one.
BENCH_STORAGE := bench/results/benchmarks
bench: $(STAMP)
	$(PY) -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-storage=$(BENCH_STORAGE) \
	    --benchmark-autosave --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-dist build dist *.egg-info pm_kernels/_C*.so pm_kernels/_build_info.json
