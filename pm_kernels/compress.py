"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2)."""
from typing import Optional

import torch

from .budget import budget_keep_rate
from .patch import patch_timm
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: float = 0.1,
             depth_discount: float = 0.025, target_gmacs: Optional[float] = None):
    """Compress a timm ViT (patched or not) in place from its (L, N−1) scores; returns the model.

    target_gmacs: a budget instead of a keep rate: the keep rate whose model does the GMACs nearest it
    (``pm_kernels.budget.budget_keep_rate``; ``keep_rate`` is then ignored).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, N-1), got {type(scores).__name__}")
    if target_gmacs is not None:
        keep_rate = budget_keep_rate(scores, model, target_gmacs, prune_rate, depth_discount).keep_rate
    structure = search_structure(scores, keep_rate=keep_rate, prune_rate=prune_rate,
                                 depth_discount=depth_discount)
    return patch_timm(model, structure=structure, scores=scores)
