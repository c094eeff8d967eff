"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2).

The one installer of a searched structure: ``patch_timm`` gives the identity, ``compress`` replaces it.
"""
from typing import Optional, Sequence, Tuple

import torch

from .budget import budget_keep_rate
from .patch import check_scores, install_structure, is_patched, patch_timm
from .segmenter import Segmenter
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: Optional[float] = None,
             depth_discount: float = 0.025, img_size: Optional[Sequence[int]] = None, *, thresholds: str = "global",
             layers: Optional[Sequence[int]] = None, target_gmacs: Optional[float] = None):
    """Compress a timm ViT (patched or not) or a ``pm_kernels.Segmenter`` (its backbone) in place from its
    (L, num_patches) scores; returns the model.

    Prefix tokens (CLS, distillation token, registers) are never pruned or merged; the scores cover the patches.
    ``img_size`` (H, W): the image size the structure is for (default the model's); a structure is bound to one
    patch grid, another size needs a model built with ``dynamic_img_size=True`` and scores calibrated at it.
    ``thresholds``: ``"global"`` (SPEC §4: thresholds over all layers, depth discount; ``prune_rate`` default
    0.1) or ``"per_layer"`` (SPEC §8, the authors' segmentation variant: each layer keeps
    int(keep_rate·patches) centres, no depth discount, ``prune_rate`` default 0). ``layers``: the blocks to
    compress (default all); the others stay dense (no M, R).
    ``target_gmacs``: a budget instead of a keep rate: the keep rate whose model (a Segmenter's backbone) does
    the GMACs nearest it (``pm_kernels.budget_keep_rate``; ``keep_rate`` is then ignored).
    """
    if isinstance(model, Segmenter):
        compress(model.backbone, scores, keep_rate, prune_rate, depth_discount, img_size, thresholds=thresholds,
                 layers=layers, target_gmacs=target_gmacs)
        return model
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, num_patches), got {type(scores).__name__}")
    if not is_patched(model):
        patch_timm(model)
    grid = _grid_of(model, img_size)
    scores = check_scores(model, scores, grid)
    search = dict(prune_rate=prune_rate, depth_discount=depth_discount, num_prefix=model.num_prefix_tokens,
                  thresholds=thresholds, layers=layers)
    if target_gmacs is not None:
        keep_rate = budget_keep_rate(scores, model, target_gmacs, **search).keep_rate
    structure = search_structure(scores, keep_rate=keep_rate, **search)
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
