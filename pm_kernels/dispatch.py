"""The one dispatch point: which backend (cuda | triton | torch) runs an op.

- ``cuda``: the compiled extension ``pm_kernels._C`` (CUDA kernels for CUDA tensors, C++ kernels for CPU
  tensors), built by ``setup.py`` / ``CMakeLists.txt`` from ``csrc/``.
- ``triton``: the Triton kernels in ``pm_kernels/kernels/``; on CUDA tensors, or on the CPU only under
  ``TRITON_INTERPRET=1`` (slow: for tests).
- ``torch``: the pure-PyTorch reference (``pm_kernels.reference``), always available.

``backend="auto"`` picks the first native backend available for CUDA tensors, in the op's own order, and
``torch`` for CPU tensors: there the reference's BLAS matmuls beat the extension's plain C++ loops and the
Triton interpreter, which exist to be tested (force them with ``backend="cuda"`` / ``"triton"``).
"""
import importlib
import os
from typing import Dict, Sequence, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_STATUS: Dict[str, Tuple[bool, str]] = {}  # a plain dict, not lru_cache: dynamo traces it without warnings


def _triton_status() -> Tuple[bool, str]:
    if "triton" not in _STATUS:
        _STATUS["triton"] = _probe_triton()
    return _STATUS["triton"]


def _extension_status() -> Tuple[bool, str]:
    if "cuda" not in _STATUS:
        _STATUS["cuda"] = _probe_extension()
    return _STATUS["cuda"]


def _probe_triton() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({err})"
    return True, f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if interpreting() else "")


def _probe_extension() -> Tuple[bool, str]:
    try:
        importlib.import_module("pm_kernels._C")
    except Exception as err:
        from ._build_info import unavailable_reason  # what setup.py recorded: why the build failed, if it did
        return False, unavailable_reason(err)
    return True, "extension pm_kernels._C loaded"


def backends() -> Dict[str, str]:
    """What each backend is, available or not, and why: ``{name: "available: ..." | "unavailable: ..."}``."""
    status = {}
    for name, (ok, why) in (("cuda", _extension_status()), ("triton", _triton_status()),
                            ("torch", (True, f"torch {torch.__version__}"))):
        if name == "triton" and ok and not torch.cuda.is_available() and not interpreting():
            ok, why = False, f"{why}, but no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
        status[name] = ("available: " if ok else "unavailable: ") + why
    return status


def usable(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run an op on tensors of ``device``."""
    if name == "torch":
        return True
    if name == "cuda":
        return _extension_status()[0] and device.type in ("cuda", "cpu")
    if name == "triton":
        return _triton_status()[0] and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    return False


def select(backend: str, device: torch.device, supported: Sequence[str], auto_order: Sequence[str]) -> str:
    """Resolve ``backend`` for an op that implements ``supported`` backends.

    ``auto`` takes the first usable one of ``auto_order``; a forced backend that cannot run raises.
    """
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    if backend == "auto":
        for name in auto_order:
            if name in supported and (device.type == "cuda" or name == "torch") and usable(name, device):
                return name
        return "torch"
    if backend not in supported:
        raise ValueError(f"backend: this op has no {backend!r} implementation (it has {', '.join(supported)})")
    if not usable(backend, device):
        raise RuntimeError(f"backend {backend!r} cannot run on {device.type} tensors: {backends()[backend]}")
    return backend
