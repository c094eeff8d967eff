"""pm_kernels: Prune-and-Merge token compression for Vision Transformers (timm, transformers, open_clip), on fused
kernels.

    import timm, pm_kernels
    model = pm_kernels.patch(timm.create_model("deit_small_patch16_224"))
    scores = pm_kernels.calibrate(model, batches)          # SPEC §3, inside the fused attention backward
    pm_kernels.compress(model, scores, keep_rate=0.6)       # SPEC §2, §4
"""
import sys
import types

from .attention import attention  # also registers its FLOP formulas with torch.utils.flop_counter
from . import dispatch as _dispatch
from .dispatch import backends
from .hosts import host_of, patch
from .hosts import timm as _timm_host  # registers the pm_* timm models
from .hosts.timm import (OptimizedPM, PMAttention, PMBlock, PMEva, PMEvaAttention, PMEvaBlock, PMVisionTransformer,
                         patch_timm)
from .layers import PMBlocks
from .pm_model import fused_block, install_structure, is_patched, set_backend
from .budget import budget_keep_rate
from .calibrate import calibrate
from .compress import compress
from .structure import LayerStructure, build_merge_matrix, init_reconstruct, search_structure
from .optimize import optimize
from .segmenter import OptimizedSegmenter, Segmenter, pixel_cross_entropy, pixel_distillation, sliding_window
from .deploy import ExportedFileError, export, load_exported
from .token_ops import merge, reconstruct, reconstruct_merge

from ._version import __version__  # set there only: pyproject.toml reads the same line
from ._build_info import warn_if_build_failed as _warn_if_build_failed

_warn_if_build_failed()  # one warning when setup.py recorded that building pm_kernels._C failed

# Module paths of 0.2, kept importable for one release: ``pm_kernels.backends`` (the dispatch module, a name the
# function ``backends()`` shadows), ``pm_kernels.models`` / ``pm_kernels.eva`` (now in the timm host) and
# ``pm_kernels.patch`` (now the function ``patch``; its module's names live in the timm host and ``pm_model``).
sys.modules.setdefault(__name__ + ".backends", _dispatch)
sys.modules.setdefault(__name__ + ".models", _timm_host.registry)
sys.modules.setdefault(__name__ + ".eva", _timm_host.eva)
_patch_module = types.ModuleType(__name__ + ".patch", "Deprecated: pm_kernels.hosts.timm and pm_kernels.pm_model.")
_patch_module.__dict__.update({name: getattr(_timm_host.model, name) for name in (
    "patch_timm", "FAMILIES", "PMVisionTransformer", "PMVisionTransformerDistilled", "PMEva")})
from . import pm_model as _pm_model  # noqa: E402
_patch_module.__dict__.update({name: getattr(_pm_model, name) for name in (
    "install_structure", "is_patched", "num_tokens", "set_backend", "check_scores")})
sys.modules.setdefault(__name__ + ".patch", _patch_module)

__all__ = [
    "attention", "backends", "budget_keep_rate", "build_merge_matrix", "calibrate", "compress", "export",
    "ExportedFileError", "fused_block", "host_of", "init_reconstruct", "install_structure", "is_patched",
    "LayerStructure", "load_exported", "merge", "optimize", "OptimizedPM", "OptimizedSegmenter", "patch",
    "patch_timm", "pixel_cross_entropy", "pixel_distillation", "PMAttention", "PMBlock", "PMBlocks", "PMEva",
    "PMEvaAttention", "PMEvaBlock", "PMVisionTransformer", "reconstruct", "reconstruct_merge", "search_structure",
    "Segmenter", "set_backend", "sliding_window",
]
