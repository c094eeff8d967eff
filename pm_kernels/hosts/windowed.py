"""What the timm and transformers hosts of SAM's image encoder share (windowed-attention ViTs,
docs/windowed_attention.md): no prefix token, tokens on the patch grid (B, H, W, C), the MACs of a windowed
layer, the K of its per-window structure, its folded form for ``optimize``.

A SAM host derives from ``WindowedHostMixin`` and its library's host, and says where its library keeps a layer's
window (``window``), its attention's linear maps (``attention_macs_per_token``) and whether it has relative
position (``uses_rel_pos``).
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..windowed import WindowedFoldedLayers, window_keep, window_layout
from .base import structure_grid

__all__ = ["WindowedHostMixin", "neck_macs", "structure_window"]


def neck_macs(neck: nn.Module, num_patches: int) -> int:
    """Multiply-adds of a convolutional neck on the patch grid (SAM's: stride 1, same size; linear maps too)."""
    convs = sum(num_patches * m.in_channels // m.groups * math.prod(m.kernel_size) * m.out_channels
                for m in neck.modules() if isinstance(m, nn.Conv2d))
    return convs + sum(num_patches * m.in_features * m.out_features for m in neck.modules()
                       if isinstance(m, nn.Linear))


def structure_window(windows: Sequence[int], model_name: str) -> int:
    """The window of every layer's structure layout: the windowed layers' one window (0: none, the whole grid).
    Windowed layers of different sizes are refused (a global layer's structure could follow either)."""
    sizes = sorted({w for w in windows if w > 0})
    if len(sizes) > 1:
        raise ValueError(f"model: {model_name} has windowed layers of different window sizes {sizes}; "
                         "Prune-and-Merge builds every layer's structure on one window layout")
    return sizes[0] if sizes else 0


class WindowedHostMixin:
    """Host methods of a windowed-attention ViT (SAM); the library's host supplies the rest."""

    def window(self, layer: nn.Module) -> int:
        """The attention window of a layer (0: global attention)."""
        raise NotImplementedError

    def attention_macs_per_token(self, layer: nn.Module) -> int:
        """Multiply-adds per token of the layer's attention linear maps (qkv, projection)."""
        raise NotImplementedError

    def uses_rel_pos(self, layer: nn.Module) -> bool:
        raise NotImplementedError

    def model_window(self, model: nn.Module) -> int:
        return structure_window([self.window(layer) for layer in self.layers(model)], type(model).__name__)

    # ---- Host methods

    def num_prefix(self, model: nn.Module) -> int:
        return 0

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        return False

    def hook_tokens(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        # the first layer takes (B, H, W, C): fn sees (B, N, C), the layer its output back on the grid
        def on_grid(_layer, args):
            tokens = args[0]
            return (fn(tokens.flatten(1, 2)).view_as(tokens),) + tuple(args[1:])
        return self.layers(model)[0].register_forward_pre_hook(on_grid)

    def layout(self, model: nn.Module, grid: Tuple[int, int]):
        w = self.model_window(model)
        return window_layout(tuple(grid), (w, w) if w else tuple(grid))

    def kept_tokens(self, model: nn.Module, structure: Sequence, grid: Tuple[int, int]) -> List[int]:
        """n_W · K per layer (every window keeps K, docs/windowed_attention.md §3); N for the identity."""
        layout = self.layout(model, grid)
        return [layout.num_tokens if bool(st.centres.all()) else
                layout.num_windows * window_keep(int(st.centres.sum()), layout) for st in structure]

    def layer_macs(self, model: nn.Module, layer: nn.Module, kept: int, grid: Tuple[int, int]) -> int:
        """A SAM layer on one image: linear maps, attention products, the relative-position products and, when
        compressed, the per-window merge and reconstruct (padding slots included, as the products run).

        Dense (``kept`` = N): a windowed layer's qkv, projection and attention run on its padded windows, its MLP
        on the N tokens; the bias products are q · Rh[h_q] (a table row per query row: G entries per query).
        Compressed: everything on the n_W·K kept tokens; the bias products q · T (2G − 1 entries per query)."""
        n = grid[0] * grid[1]
        width = self.attention_width(layer)
        attention_linear = self.attention_macs_per_token(layer)
        other_linear = self.layer_macs_per_token(layer) - attention_linear
        w = self.window(layer)
        sides = (w, w) if w else tuple(grid)
        rel_pos = self.uses_rel_pos(layer)
        if kept == n:
            if w:
                windows = window_layout(tuple(grid), (w, w))
                attended, group, groups = windows.num_windows * windows.slots, windows.slots, windows.num_windows
            else:
                attended, group, groups = n, n, 1
            bias = attended * sum(sides) * width if rel_pos else 0
            return (attended * attention_linear + n * other_linear + 2 * groups * group * group * width + bias)
        layout = self.layout(model, grid)
        k = kept // layout.num_windows
        group, groups = (k, layout.num_windows) if w else (kept, 1)
        bias = kept * sum(2 * s - 1 for s in sides) * width if rel_pos else 0
        merge = 2 * kept * layout.slots * self.embed_dim(model)
        return kept * (attention_linear + other_linear) + 2 * groups * group * group * width + bias + merge

    def fold_layers(self, model: nn.Module, backend: str, dtype: Optional[torch.dtype]) -> nn.Module:
        layers = self.layers(model)
        grid = structure_grid(layers, 0, self.grid(model)) or self.grid(model)
        return WindowedFoldedLayers(layers, grid, self.reference_tensor(model), dtype=dtype)
