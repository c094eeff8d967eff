"""What building the native extension ``pm_kernels._C`` did, as ``setup.py`` recorded it.

``setup.py`` writes ``_build_info.json`` next to this file whenever it builds the package, extension or not:

    {"extension": "built" | "failed" | "skipped", "reason": why not built, or why CPU kernels only (or null),
     "kernels": "cpu+cuda" | "cpu" (when built), "cuda_failed": whether the CUDA kernels failed to compile,
     "torch": the torch version it was built against}

A pip install can succeed without the extension (pip hides the build's output), so the record is how the
package itself says what happened: ``import pm_kernels`` warns once when the build failed, and
``pm_kernels.backends()`` says why backend "cuda" is unavailable. A source checkout that was never built has
no record. Reading it imports nothing heavy: the extension itself stays a lazy import.
"""
import json
import os
import warnings
from typing import Any, Dict, Optional

__all__ = ["RECORD_PATH", "ExtensionBuildWarning", "read", "unavailable_reason", "warn_if_build_failed"]

RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
REBUILD_HINT = "rebuild with `pip install --no-build-isolation .` (README: Build)"


class ExtensionBuildWarning(UserWarning):
    """The native extension pm_kernels._C (or its CUDA kernels) failed to build at install time."""


def read(path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The build record (``RECORD_PATH`` unless ``path``), or None when there is none (a source checkout that
    was never built)."""
    path = RECORD_PATH if path is None else path
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"extension": "unknown", "reason": f"unreadable build record {path} ({err})"}
    if not isinstance(record, dict):
        return {"extension": "unknown", "reason": f"malformed build record {path}"}
    return record


def unavailable_reason(error: BaseException, record: Optional[Dict[str, Any]] = None) -> str:
    """One line saying why ``import pm_kernels._C`` raised ``error``, from the build record (read if None)."""
    record = read() if record is None else record
    status = (record or {}).get("extension")
    reason = (record or {}).get("reason")
    if status == "failed":
        return f"building pm_kernels._C failed at install time: {reason}; {REBUILD_HINT}"
    if status == "skipped":
        return f"pm_kernels._C was not built: {reason}"
    if status == "built":
        import torch  # already imported by the caller; here only to compare versions

        built_against = record.get("torch")
        if built_against and built_against != torch.__version__:
            return (f"pm_kernels._C was built against torch {built_against} but this is torch "
                    f"{torch.__version__} ({error}); {REBUILD_HINT}")
        return f"pm_kernels._C was built but does not load ({error}); {REBUILD_HINT}"
    return (f"extension pm_kernels._C not built ({error}); "
            "build it with `pip install --no-build-isolation -e .`")


def warn_if_build_failed(record: Optional[Dict[str, Any]] = None) -> None:
    """One ExtensionBuildWarning when the record says the build failed, or fell back to CPU kernels only."""
    record = read() if record is None else record
    if not record:
        return
    if record.get("extension") == "failed":
        warnings.warn(f"pm_kernels: the native extension pm_kernels._C was not built ({record.get('reason')}): "
                      "backend 'cuda' is unavailable, 'torch' and 'triton' still work; "
                      "pm_kernels.backends() says more", ExtensionBuildWarning, stacklevel=3)
    elif record.get("cuda_failed"):
        warnings.warn(f"pm_kernels: {record.get('reason')}: pm_kernels._C was built with its CPU kernels only",
                      ExtensionBuildWarning, stacklevel=3)
