"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2).

The one installer of a searched structure: ``patch_timm`` gives the identity, ``compress`` replaces it.
"""
import torch

from .patch import check_scores, install_structure, is_patched, patch_timm
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: float = 0.1,
             depth_discount: float = 0.025):
    """Compress a timm ViT (patched or not) in place from its (L, num_patches) scores; returns the model."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, num_patches), got {type(scores).__name__}")
    if not is_patched(model):
        patch_timm(model)
    structure = search_structure(check_scores(model, scores), keep_rate=keep_rate, prune_rate=prune_rate,
                                 depth_discount=depth_discount)
    install_structure(model, structure, scores)
    return model
