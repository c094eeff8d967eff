"""The one dispatch point: which backend (cuda | triton | torch) runs an op, decided from one capability table.

- ``cuda``: the compiled extension ``pm_kernels._C`` (CUDA kernels for CUDA tensors, C++ kernels for CPU
  tensors), built by ``setup.py`` / ``CMakeLists.txt`` from ``csrc/``.
- ``triton``: the Triton kernels in ``pm_kernels/kernels/``; on CUDA tensors, or on the CPU only under
  ``TRITON_INTERPRET=1`` (slow: for tests).
- ``torch``: the pure-PyTorch reference (``pm_kernels.reference``; attention without a score: SDPA), always
  available.

Every op declares in ``CAPABILITIES`` what each backend runs (devices, activation dtypes, head dims, features).
``select`` reads it once per (op, backend, device type, dtype, head dim, features) and caches the answer:

- ``backend="auto"`` takes, for CUDA tensors, the first backend of ``AUTO_ORDER[op]`` that is available and
  supports the input; for other tensors ``torch``, whose BLAS matmuls beat the extension's plain C++ loops and
  the Triton interpreter (those exist to be tested: force them with ``backend="cuda"`` / ``"triton"``).
- a forced backend that cannot run the input raises one error naming the argument, the op, the backend and the
  reason: ``ValueError`` when the input is the reason (dtype, head dim, feature), ``RuntimeError`` when the
  backend is missing here (not built, not installed, no GPU).
"""
import importlib
import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch

__all__ = ["BACKENDS", "CAPABILITIES", "AUTO_ORDER", "Support", "backends", "interpreting", "select", "usable"]

BACKENDS = ("cuda", "triton", "torch")

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Support:
    """What one backend of one op runs. ``dtypes``: of the activations (q / x; M and R may be any float dtype,
    they are used in x's). ``head_dims``: None = any. ``features``: optional behaviours it implements."""

    dtypes: Tuple[torch.dtype, ...] = _FLOAT
    head_dims: Optional[Tuple[int, ...]] = None
    features: FrozenSet[str] = frozenset()


_TOKEN_OP = {"cuda": Support(), "triton": Support(dtypes=_TRITON_FLOAT), "torch": Support()}

CAPABILITIES: Dict[str, Dict[str, Support]] = {
    # features: "score" = emits the SPEC §3 score in backward; "dropout" = attention-probability dropout;
    # "bias" = a general additive logit bias; "rel_pos_bias" = the decomposed relative-position bias (SAM).
    "attention": {
        "triton": Support(dtypes=_TRITON_FLOAT, head_dims=(32, 64, 128),
                          features=frozenset({"score", "bias", "rel_pos_bias"})),
        "torch": Support(features=frozenset({"score", "dropout", "bias", "rel_pos_bias"})),
    },
    "merge": _TOKEN_OP,
    "reconstruct": _TOKEN_OP,
    "reconstruct_merge": _TOKEN_OP,
}

# The order "auto" tries for CUDA tensors; the compiled extension has no attention kernel.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "attention": ("triton", "torch"),
    "merge": ("cuda", "triton", "torch"),
    "reconstruct": ("cuda", "triton", "torch"),
    "reconstruct_merge": ("cuda", "triton", "torch"),
}


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------ availability (probed once)

_STATUS: Dict[str, Tuple[bool, str]] = {}  # plain dicts, not lru_cache: dynamo traces them without warnings


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


def _extension_has_cuda_kernels() -> bool:
    if "cuda-kernels" not in _STATUS:
        try:  # the ops exist once pm_kernels._C is loaded (_status("cuda") loads it)
            has = _status("cuda")[0] and torch._C._dispatch_has_kernel_for_dispatch_key("pm_kernels::merge_fwd",
                                                                                         "CUDA")
        except RuntimeError:
            has = False
        _STATUS["cuda-kernels"] = (has, "")
    return _STATUS["cuda-kernels"][0]


def _status(name: str) -> Tuple[bool, str]:
    if name not in _STATUS:
        _STATUS[name] = {"cuda": _probe_extension, "triton": _probe_triton,
                         "torch": lambda: (True, f"torch {torch.__version__}")}[name]()
    return _STATUS[name]


def _runs_on(name: str, device_type: str) -> Tuple[bool, str]:
    """Whether backend ``name`` is installed here and runs on tensors of ``device_type`` (and why not)."""
    ok, why = _status(name)
    if not ok or name == "torch":
        return ok, why
    if name == "cuda" and device_type not in ("cuda", "cpu"):
        return False, f"the extension has kernels for cuda and cpu tensors, not {device_type}"
    if name == "cuda" and device_type == "cuda" and not _extension_has_cuda_kernels():
        return False, "the extension was built without its CUDA kernels (CPU-only build)"
    if name == "triton" and device_type != "cuda" and not (device_type == "cpu" and interpreting()):
        return False, (f"triton runs on cuda tensors (cpu tensors only with TRITON_INTERPRET=1), "
                       f"got {device_type} tensors")
    return True, why


def backends() -> Dict[str, str]:
    """What each backend is, available or not, and why: ``{name: "available: ..." | "unavailable: ..."}``."""
    status = {}
    for name in BACKENDS:
        ok, why = _status(name)
        if name == "triton" and ok and not torch.cuda.is_available() and not interpreting():
            ok, why = False, f"{why}, but no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
        status[name] = ("available: " if ok else "unavailable: ") + why
    return status


def usable(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` is available here for tensors on ``device`` (whatever their dtype)."""
    return name in BACKENDS and _runs_on(name, torch.device(device).type)[0]


# ------------------------------------------------------------------------------------------- selection

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _unsupported(op: str, name: str, dtype: torch.dtype, head_dim: Optional[int],
                 features: FrozenSet[str], arg: str) -> Optional[str]:
    """Why backend ``name`` of ``op`` cannot run this input (an error message), or None if it can."""
    support = CAPABILITIES[op][name]
    prefix = f"{arg}: the {name} backend of {op}"
    if dtype not in support.dtypes:
        return (f"{prefix} supports dtypes {', '.join(map(_dtype_name, support.dtypes))}, "
                f"got {_dtype_name(dtype)}")
    if support.head_dims is not None and head_dim not in support.head_dims:
        return f"{prefix} supports head dims {', '.join(map(str, support.head_dims))}, got {head_dim}"
    missing = sorted(features - support.features)
    if missing:
        return f"{prefix} does not implement {' and '.join(missing)}"
    return None


_RESOLVED: Dict[tuple, str] = {}


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None,
           features: FrozenSet[str] = frozenset(), arg: str = "x") -> str:
    """The backend that runs ``op`` on an input of ``device`` / ``dtype`` (/ ``head_dim``) needing ``features``.

    ``arg`` names the input argument in errors. Resolved once per key and cached; errors are raised each time.
    """
    key = (op, backend, device.type, dtype, head_dim, features)
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(op, backend, device.type, dtype, head_dim, features, arg)
        _RESOLVED[key] = name
    return name


def _resolve(op, backend, device_type, dtype, head_dim, features, arg) -> str:
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    table = CAPABILITIES[op]
    if backend == "auto":
        order = AUTO_ORDER[op] if device_type == "cuda" else ("torch",)
        for name in order:
            if (_runs_on(name, device_type)[0]
                    and _unsupported(op, name, dtype, head_dim, features, arg) is None):
                return name
        reason = _unsupported(op, "torch", dtype, head_dim, features, arg)
        raise ValueError(reason or f"{arg}: no backend of {op} runs on {device_type} tensors")
    if backend not in table:
        raise ValueError(f"backend: {op} has no {backend!r} implementation (it has {', '.join(table)})")
    reason = _unsupported(op, backend, dtype, head_dim, features, arg)
    if reason is not None:
        raise ValueError(f"{reason} (use backend='auto' or 'torch')")
    ok, why = _runs_on(backend, device_type)
    if not ok:
        raise RuntimeError(f"backend {backend!r} cannot run {op} on {device_type} tensors: {why}")
    return backend


def model_backend(op: str, backend: str) -> str:
    """The backend a model-wide choice ``backend`` gives ``op``: itself where the op implements it, else auto
    (``set_backend(model, "cuda")`` runs the token ops on the extension and attention on auto)."""
    return backend if backend == "auto" or backend in CAPABILITIES[op] else "auto"
