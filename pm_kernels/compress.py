"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2).

The one installer of a searched structure: ``patch_timm`` gives the identity, ``compress`` replaces it.
"""
from typing import Optional, Sequence, Tuple

import torch

from .budget import budget_keep_rate
from .patch import check_scores, install_structure, is_patched, patch_timm
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: float = 0.1,
             depth_discount: float = 0.025, img_size: Optional[Sequence[int]] = None,
             target_gmacs: Optional[float] = None):
    """Compress a timm ViT (patched or not) in place from its (L, num_patches) scores; returns the model.

    Prefix tokens (CLS, distillation token, registers) are never pruned or merged; the scores cover the patches.
    ``img_size`` (H, W): the image size the structure is for (default the model's); a structure is bound to one
    patch grid, another size needs a model built with ``dynamic_img_size=True`` and scores calibrated at it.
    target_gmacs: a budget instead of a keep rate: the keep rate whose model does the GMACs nearest it
    (``pm_kernels.budget.budget_keep_rate``; ``keep_rate`` is then ignored).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, num_patches), got {type(scores).__name__}")
    if not is_patched(model):
        patch_timm(model)
    grid = _grid_of(model, img_size)
    scores = check_scores(model, scores, grid)
    if target_gmacs is not None:
        keep_rate = budget_keep_rate(scores, model, target_gmacs, prune_rate, depth_discount).keep_rate
    structure = search_structure(scores, keep_rate=keep_rate, prune_rate=prune_rate,
                                 depth_discount=depth_discount, num_prefix=model.num_prefix_tokens)
    install_structure(model, structure, scores, grid)
    return model


def _grid_of(model, img_size) -> Optional[Tuple[int, int]]:
    if img_size is None:
        return None
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    ph, pw = model.patch_embed.patch_size
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in img_size)
            or img_size[0] % ph or img_size[1] % pw):
        raise ValueError(f"img_size: expected (H, W), positive ints that are multiples of the patch size "
                         f"{(ph, pw)}, got {img_size!r}")
    return img_size[0] // ph, img_size[1] // pw
