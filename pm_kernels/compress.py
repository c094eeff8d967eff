"""``compress``: calibration scores → structure (SPEC §4) → M, R, keep masks in every block (SPEC §2).

The one installer of a searched structure: ``patch`` gives the identity, ``compress`` replaces it.
"""
from typing import Optional, Sequence

import torch

from .budget import budget_keep_rate
from .hosts import resolve
from .pm_model import check_scores, grid_of_size, install_structure
from .structure import search_structure

__all__ = ["compress"]


def compress(model, scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: Optional[float] = None,
             depth_discount: float = 0.025, img_size: Optional[Sequence[int]] = None, *, thresholds: str = "global",
             layers: Optional[Sequence[int]] = None, target_gmacs: Optional[float] = None):
    """Compress a ViT of any supported host (patched or not) or a task model (``pm_kernels.Segmenter``: its
    backbone) in place from its (L, num_patches) scores; returns the model.

    Prefix tokens (CLS, distillation token, registers) are never pruned or merged; the scores cover the patches.
    ``img_size`` (H, W): the image size the structure is for (default the model's); a structure is bound to one
    patch grid, another size needs a model that runs other sizes (timm: ``dynamic_img_size=True``) and scores
    calibrated at it.
    ``thresholds``: ``"global"`` (SPEC §4: thresholds over all layers, depth discount; ``prune_rate`` default
    0.1) or ``"per_layer"`` (SPEC §8, the authors' segmentation variant: each layer keeps
    int(keep_rate·patches) centres, no depth discount, ``prune_rate`` default 0). ``layers``: the blocks to
    compress (default all); the others stay dense (no M, R).
    ``target_gmacs``: a budget instead of a keep rate: the keep rate whose model (a Segmenter's backbone) does
    the GMACs nearest it (``pm_kernels.budget_keep_rate``; ``keep_rate`` is then ignored).
    """
    host, backbone = resolve(model)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a tensor of shape (L, num_patches), got {type(scores).__name__}")
    if not host.is_patched(backbone):
        host.patch(backbone)
    grid = grid_of_size(backbone, img_size)
    scores = check_scores(backbone, scores, grid)
    search = dict(prune_rate=prune_rate, depth_discount=depth_discount, num_prefix=host.num_prefix(backbone),
                  thresholds=thresholds, layers=layers)
    if target_gmacs is not None:
        keep_rate = budget_keep_rate(scores, backbone, target_gmacs, **search).keep_rate
    structure = search_structure(scores, keep_rate=keep_rate, **search)
    install_structure(backbone, structure, scores, grid)
    return model
