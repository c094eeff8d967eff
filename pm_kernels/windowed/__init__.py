"""Prune and Merge for windowed-attention ViTs (SAM's image encoder), host-neutral: docs/windowed_attention.md.

``layout``: windows of a padded patch grid; ``structure``: a layer's per-window structure from its searched one;
``attention``: SAM's attention with its decomposed relative-position bias through ``pm_kernels.attention``;
``block``: the PM layer mixin (dense, and merge → body → reconstruct per window); ``folded``: ``optimize``'s
folded chain. The hosts (timm, transformers) make the classes.
"""
from .attention import WindowedAttentionMixin, grid_attention, positional_attention
from .block import WindowedPMBlockMixin
from .folded import WindowedFoldedLayers
from .layout import WindowLayout, partition, unpartition, window_layout
from .structure import EMPTY_SLOT, check_windowed_structure, window_keep, windowed_structure

__all__ = ["WindowedAttentionMixin", "WindowedPMBlockMixin", "WindowedFoldedLayers", "WindowLayout", "EMPTY_SLOT",
           "check_windowed_structure", "grid_attention", "partition", "positional_attention", "unpartition",
           "window_keep", "window_layout", "windowed_structure"]
