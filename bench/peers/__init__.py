"""Peer token-reduction methods for side-by-side benchmarks against PM (issue 6).

- ``tome``: Token Merging (Bolya et al. 2023), ``patch_tome(model, r)``.
- ``evit``: EViT (Liang et al. 2022), ``patch_evit(model, keep_rate, locations)``.
- ``flops``: analytic GFLOPs of a timm ViT for per-layer token counts (1 MAC = 1 FLOP, the literature's
  convention) and the helpers that match ToMe's r / EViT's keep rate to a target (PM's MACs: the library's
  ``pm_kernels.measure``).

Both patches are class swaps on a timm ``VisionTransformer``: no new parameters, any checkpoint loads,
and the patched model trains like the dense one.
"""
from .evit import default_locations, patch_evit
from .flops import (dense_flops, dims_from_config, dims_from_model, evit_flops, match_evit_keep_rate,
                    match_tome_r, tome_flops, vit_flops)
from .tome import patch_tome, tome_schedule

__all__ = ["patch_tome", "tome_schedule", "patch_evit", "default_locations", "vit_flops", "dense_flops",
           "tome_flops", "evit_flops", "match_tome_r",
           "match_evit_keep_rate", "dims_from_model", "dims_from_config"]
