"""pm_kernels: Prune-and-Merge token compression for timm Vision Transformers, on fused kernels.

    import timm, pm_kernels
    model = pm_kernels.patch_timm(timm.create_model("deit_small_patch16_224"))
    scores = pm_kernels.calibrate(model, batches)          # SPEC §3, inside the fused attention backward
    pm_kernels.compress(model, scores, keep_rate=0.6)       # SPEC §2, §4
"""
import sys

from . import models  # noqa: F401  (registers the pm_* timm models)
from .attention import attention  # also registers its FLOP formulas with torch.utils.flop_counter
from . import dispatch as _dispatch
from .dispatch import backends
from .block import fused_block
from .budget import budget_keep_rate
from .calibrate import calibrate
from .compress import compress
from .layers import PMAttention, PMBlock, PMBlocks
from .eva import PMEvaAttention, PMEvaBlock
from .patch import PMEva, PMVisionTransformer, is_patched, patch_timm, set_backend
from .structure import LayerStructure, build_merge_matrix, init_reconstruct, search_structure
from .optimize import OptimizedPM, optimize
from .segmenter import OptimizedSegmenter, Segmenter, pixel_cross_entropy, pixel_distillation, sliding_window
from .deploy import export
from .token_ops import merge, reconstruct, reconstruct_merge

from ._version import __version__  # set there only: pyproject.toml reads the same line
from ._build_info import warn_if_build_failed as _warn_if_build_failed

_warn_if_build_failed()  # one warning when setup.py recorded that building pm_kernels._C failed

# The dispatch module was ``pm_kernels.backends`` until 0.1, a name the function ``backends()`` shadows.
# ``import pm_kernels.backends`` / ``from pm_kernels.backends import ...`` keep working for one release.
sys.modules.setdefault(__name__ + ".backends", _dispatch)

__all__ = [
    "attention", "backends", "budget_keep_rate", "build_merge_matrix", "calibrate", "compress", "export",
    "fused_block", "init_reconstruct", "is_patched", "LayerStructure", "merge", "optimize", "OptimizedPM",
    "OptimizedSegmenter", "patch_timm", "pixel_cross_entropy", "pixel_distillation", "PMAttention", "PMBlock",
    "PMBlocks", "PMEva", "PMEvaAttention", "PMEvaBlock", "PMVisionTransformer", "reconstruct", "reconstruct_merge",
    "search_structure", "Segmenter", "set_backend", "sliding_window",
]
