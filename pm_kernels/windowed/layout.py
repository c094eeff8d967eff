"""The window geometry of a windowed-attention ViT (SAM, ViTDet): a patch grid cut into windows after padding.

SAM's windowed block pads the ``H × W`` grid (bottom / right) to multiples of the window ``(wh, ww)``, cuts
``n_W`` windows of ``S = wh·ww`` slots, and orders them window-major (windows in raster order, slots in raster
order inside a window). A slot of the padding is not a token; the real tokens of a window are the top-left
``h_ω × w_ω`` corner of its slots. ``partition`` / ``unpartition`` are SAM's ``window_partition`` /
``window_unpartition`` on (B, H, W, C) tokens.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["WindowLayout", "window_layout", "partition", "unpartition"]


@dataclass(frozen=True)
class WindowLayout:
    """``grid`` (H, W) of real tokens cut into windows of ``window`` (wh, ww) after padding."""

    grid: Tuple[int, int]
    window: Tuple[int, int]

    @property
    def windows(self) -> Tuple[int, int]:
        """(rows, columns) of windows: ⌈H / wh⌉, ⌈W / ww⌉."""
        return -(-self.grid[0] // self.window[0]), -(-self.grid[1] // self.window[1])

    @property
    def num_windows(self) -> int:
        return self.windows[0] * self.windows[1]

    @property
    def slots(self) -> int:
        """S: slots per window (real tokens and padding)."""
        return self.window[0] * self.window[1]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def window_grid(self, window: int) -> Tuple[int, int]:
        """(h_ω, w_ω): the real tokens of window ``window`` (the rest of its slots is padding)."""
        row, col = divmod(window, self.windows[1])
        wh, ww = self.window
        return min(wh, self.grid[0] - row * wh), min(ww, self.grid[1] - col * ww)

    @property
    def max_real(self) -> int:
        """Real tokens of the fullest window (the first: windows are filled from the top-left)."""
        h, w = self.window_grid(0)
        return h * w

    def window_tokens(self, window: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raster indices of the window's real tokens, their slots), both in the window's raster order."""
        return _window_tokens(self.grid, self.window)[window]

    def token_slot(self) -> torch.Tensor:
        """(N,) int64: the flat window-major slot (ω·S + s) of every raster token."""
        slot = torch.empty(self.num_tokens, dtype=torch.long)
        for window, (tokens, slots) in enumerate(_window_tokens(self.grid, self.window)):
            slot[tokens] = window * self.slots + slots
        return slot


@lru_cache(maxsize=None)
def window_layout(grid: Tuple[int, int], window: Tuple[int, int]) -> WindowLayout:
    """The layout of ``grid`` cut into ``window`` (both (rows, columns) of positive ints)."""
    for name, value in (("grid", grid), ("window", window)):
        if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
            raise ValueError(f"{name}: expected (rows, columns), two positive ints, got {value!r}")
    return WindowLayout(tuple(grid), tuple(window))


@lru_cache(maxsize=None)
def _window_tokens(grid: Tuple[int, int], window: Tuple[int, int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    layout = WindowLayout(grid, window)
    wh, ww = window
    out = []
    for index in range(layout.num_windows):
        row, col = divmod(index, layout.windows[1])
        h, w = layout.window_grid(index)
        local_rows = torch.arange(h).repeat_interleave(w)
        local_cols = torch.arange(w).repeat(h)
        tokens = (row * wh + local_rows) * grid[1] + col * ww + local_cols
        out.append((tokens, local_rows * ww + local_cols))
    return out


def partition(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B, H, W, C) → (B, n_W, S, C), zero padding in the slots past the grid (SAM's ``window_partition``)."""
    B, H, W, C = x.shape
    (nh, nw), (wh, ww) = layout.windows, layout.window
    pad_h, pad_w = nh * wh - H, nw * ww - W
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, nh * nw, wh * ww, C)


def unpartition(windows: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """(B, n_W, S, C) → (B, H, W, C), the padding slots dropped (SAM's ``window_unpartition``)."""
    B, C = windows.shape[0], windows.shape[-1]
    (nh, nw), (wh, ww), (H, W) = layout.windows, layout.window, layout.grid
    x = windows.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nh * wh, nw * ww, C)
    return x[:, :H, :W] if (nh * wh, nw * ww) != (H, W) else x
