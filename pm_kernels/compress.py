"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2)."""
import torch

from .patch import patch_timm
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: float = 0.1,
             depth_discount: float = 0.025):
    """Compress a timm ViT (patched or not) in place from its (L, N−1) scores; returns the model."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, N-1), got {type(scores).__name__}")
    structure = search_structure(scores, keep_rate=keep_rate, prune_rate=prune_rate,
                                 depth_discount=depth_discount)
    return patch_timm(model, structure=structure, scores=scores)
