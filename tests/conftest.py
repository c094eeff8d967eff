"""Test-session set-up, the one place for it.

- Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be on before triton or
  pm_kernels' kernel modules are imported, and pytest imports this file before any test module.
- The shared test modules (helpers.py, formulas.py, windowed_formula.py, triton_aot.py) are imported by name,
  whatever the import mode pytest is configured with.
- ``one_torch_thread``: a module fixture, one torch thread while the module runs (the CPU is shared).
- Markers: ``slow`` (CI runs them; ``-m "not slow"`` leaves them out locally), ``gpu`` (the GPU-only matrix,
  run first on a machine with a GPU, where device time is short).
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tens of seconds on a CPU (interpreter, inductor, subprocesses); "
                                       "CI runs them, `-m 'not slow'` leaves them out")
    config.addinivalue_line("markers", "gpu: part of the GPU-only matrix; run before the other tests when a GPU "
                                       "is present")


def gpu_first(items):
    """``items`` reordered: those marked ``gpu`` first, each group in its collected order."""
    return sorted(items, key=lambda item: item.get_closest_marker("gpu") is None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items[:] = gpu_first(items)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared CPU, extra OpenMP threads spin against other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
