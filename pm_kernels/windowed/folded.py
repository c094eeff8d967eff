"""``optimize`` for a windowed-attention ViT (SAM): the layer boundaries folded per window.

Every compressed layer's M, R are block-diagonal over the same windows, so the fold of ``pm_kernels.optimize``
(SPEC §1 between layers l and l+1, only the pruned rows of x carried) holds window by window. Per window ω, with
Sel_l (p_l × S) the rows of the slots pruned at l (p_l: the most any window prunes; a window that prunes fewer
has zero rows) and y_l = [z_l ; Sel_l x_l] (K_l + p_l tokens):

    y_{l+1} = W_l y_l,   W_l = [[M_{l+1} R_l, M_{l+1} Sel_lᵀ], [Sel_{l+1} R_l, Sel_{l+1} Sel_lᵀ]]

entry y = [M ; Sel] x_ω, exit x_ω = [R | Selᵀ] y (R with the columns of empty slots zeroed). A layer without a
structure (the dense layer) is a break in the chain: the tokens are reconstructed before it and merged again
after. Tokens go in and come out on the patch grid, (B, H, W, C), as the library's layer loop has them.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .block import WindowedPMBlockMixin
from .layout import WindowLayout, partition, unpartition

__all__ = ["WindowedFoldedLayers"]


def _selection(keep_mask: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Sel (n_W, p, S) float64: per window, one row per pruned slot (p the most any window has; zero rows pad)."""
    pruned = [torch.nonzero(~keep_mask[tokens]).flatten() for tokens, _ in
              (layout.window_tokens(w) for w in range(layout.num_windows))]
    p = max(len(index) for index in pruned)
    sel = torch.zeros(layout.num_windows, p, layout.slots, dtype=torch.float64)
    for window, index in enumerate(pruned):
        slots = layout.window_tokens(window)[1][index]
        sel[window, torch.arange(len(index)), slots] = 1.0
    return sel


class WindowedFoldedLayers(nn.Module):
    """The folded boundaries of a chain of windowed PM layers (buffers ``enter{l}``, ``step{l}``, ``exit{l}``):
    tokens (B, H, W, C) entering the first layer → tokens after the last. Holds no layer: ``forward`` is given
    them."""

    def __init__(self, layers: Sequence[WindowedPMBlockMixin], grid: Tuple[int, int], like: torch.Tensor,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        dtype = like.dtype if dtype is None else dtype
        self.folded_dtype = dtype
        self.grid = tuple(grid)
        n = grid[0] * grid[1]
        compressed = [not layer.is_identity for layer in layers]
        layouts = {layer.structure_layout(self.grid) for layer, c in zip(layers, compressed) if c}
        if len(layouts) > 1:
            raise ValueError("model: its compressed layers are built on different window layouts; optimize folds "
                             "one layout")
        self.layout: Optional[WindowLayout] = layouts.pop() if layouts else None
        self.kept: List[int] = [layer.num_kept(n) for layer in layers]
        self.carried: List[int] = [0] * len(layers)  # K_l + p_l: the folded state's tokens per window
        parts = {}
        for index, layer in enumerate(layers):
            if compressed[index]:
                M = layer.M.detach().double().cpu()
                R = layer.reconstruct_matrix().detach().double().cpu()
                sel = _selection(layer.keep_mask.cpu(), self.layout)
                parts[index] = (M, R, sel)
                self.carried[index] = M.shape[1] + sel.shape[1]

        def store(name: str, w: torch.Tensor, k: Optional[int] = None) -> None:
            # a boundary's columns split: those of the K body outputs, those of the carried pruned rows
            parts_of = [(name, w)] if k is None else [(name, w[:, :, :k]), (name + "_carried", w[:, :, k:])]
            for key, part in parts_of:
                empty = part.shape[-1] == 0
                self.register_buffer(key, None if empty else part.contiguous().to(like.device, dtype),
                                     persistent=False)

        for index in parts:
            M, R, sel = parts[index]
            if index - 1 not in parts:
                store(f"enter{index}", torch.cat([M, sel], dim=1))
            if index + 1 in parts:
                M2, _, sel2 = parts[index + 1]
                store(f"step{index}", torch.cat([torch.cat([M2 @ R, M2 @ sel.transpose(1, 2)], dim=2),
                                                 torch.cat([sel2 @ R, sel2 @ sel.transpose(1, 2)], dim=2)], dim=1),
                      M.shape[1])
            else:
                store(f"exit{index}", torch.cat([R, sel.transpose(1, 2)], dim=2), M.shape[1])

    def forward(self, x: torch.Tensor, layers: Sequence[WindowedPMBlockMixin], *extra,
                prefix_only: bool = False) -> torch.Tensor:
        """x (B, H, W, C) → (B, H, W, C) after the last layer (``prefix_only``: no prefix tokens here, ignored)."""
        y = None
        for index, layer in enumerate(layers):
            if self.carried[index] == 0:
                x = layer.dense_forward(x)
                continue
            if y is None:
                y = torch.matmul(getattr(self, f"enter{index}"), partition(x, self.layout))
            k = self.kept[index] // self.layout.num_windows
            z = layer.body(y[:, :, :k], self.layout)
            name = f"step{index}" if hasattr(self, f"step{index}") else f"exit{index}"
            out = torch.matmul(getattr(self, name), z)
            carried = getattr(self, name + "_carried")
            if carried is not None:
                out = out + torch.matmul(carried, y[:, :, k:])
            if name.startswith("step"):
                y = out
            else:
                x, y = unpartition(out, self.layout), None
        return x
