"""A PM layer of a windowed-attention ViT (SAM's image encoder): docs/windowed_attention.md §1.

Tokens stay on the patch grid, (B, H, W, C), as the library's layers take them. A layer with a structure holds,
over the windows of its *structure layout* (the model's window size, or the whole grid when the model has no
windowed layer), M (n_W, K, S) and R (n_W, S, K) (trainable), keep_mask bool (N,) and centre_slot int64 (n_W, K)
(each merged token's centre, −1 for an empty slot):

    shortcut = (1 − m) ⊙ x
    z_ω = M_ω x_ω                     every window ω: its S slots (real tokens and padding) → K tokens
    z = z + Attn(LN1(z))               windowed layer: within each window's K tokens; global: over all n_W·K
    z = z + MLP(LN2(z))
    out_ω = R_ω z_ω + shortcut         (R with the columns of empty slots zeroed, whatever training did)

Merged tokens sit at their centre's position in the relative-position bias; empty slots are masked as keys. A
layer without a structure is the library's dense layer (padding attended in windowed layers), computed here so
that calibration can score each window's keys. The host's layer class says where the norms, the residual
branches and its attention module are (``pm_norm1``, ``pm_attention_branch``, ``pm_mlp_branch``,
``pm_attention``).
"""
from typing import Optional, Tuple

import torch

from ..layers import PMBlockMixin
from ..structure import LayerStructure
from .attention import grid_attention, positional_attention
from .layout import WindowLayout, partition, unpartition, window_layout
from .structure import EMPTY_SLOT, check_windowed_structure, windowed_structure

__all__ = ["WindowedPMBlockMixin"]


class WindowedPMBlockMixin(PMBlockMixin):
    """SPEC §1 per window around a SAM layer (see the module docstring)."""

    structure_keys = PMBlockMixin.structure_keys + ("centre_slot",)

    # ---- what the host's layer class gives

    @property
    def pm_attention(self):
        raise NotImplementedError

    def pm_norm1(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pm_attention_branch(self, a: torch.Tensor) -> torch.Tensor:
        """The attention output as the residual adds it (layer scale, drop path)."""
        raise NotImplementedError

    def pm_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP residual adds to x (norm, MLP, layer scale, drop path)."""
        raise NotImplementedError

    # ---- state

    def init_pm(self, num_prefix: int, window: int = 0, structure_window: int = 0) -> None:
        """``window``: the attention window (0: a global layer); ``structure_window``: the window of the
        structure layout (the model's window size; 0: the whole grid, one window)."""
        super().init_pm(num_prefix)
        self.pm_window: int = window
        self.pm_structure_window: int = structure_window
        self.register_buffer("centre_slot", None)
        self.pm_attention.score_queries = window * window if window else None

    def structure_layout(self, grid: Tuple[int, int]) -> WindowLayout:
        w = self.pm_structure_window
        return window_layout(tuple(grid), (w, w) if w else tuple(grid))

    def num_kept(self, n_tokens: int) -> int:
        return n_tokens if self.M is None else self.M.shape[0] * self.M.shape[1]

    def set_identity(self) -> None:
        super().set_identity()
        self.centre_slot = None

    def set_structure(self, M, R, keep_mask, n_tokens=None) -> None:
        raise TypeError(f"{type(self).__name__}: a windowed layer's structure is per window: "
                        "set_windowed_structure(M (windows, K, slots), R, keep_mask, centre_slot)")

    def set_windowed_structure(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                               centre_slot: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> None:
        """Install a per-window structure after checking it (against ``grid``'s layout when given)."""
        check_windowed_structure(M, R, keep_mask, centre_slot)
        if grid is not None:
            self._check_layout(self.structure_layout(grid), M, keep_mask, "M")
        self._install_windowed(M, R, keep_mask, centre_slot)
        self.pm_grid = None if grid is None else tuple(grid)

    def install_searched(self, structure: LayerStructure, scores: torch.Tensor, grid: Tuple[int, int]) -> None:
        if bool(structure.centres.all()):
            self.set_identity()
            return
        M, R, keep_mask, centre_slot = windowed_structure(structure, scores, self.structure_layout(grid))
        self.set_windowed_structure(M, R, keep_mask, centre_slot, grid)

    def _install_windowed(self, M, R, keep_mask, centre_slot) -> None:
        ref = self._reference_tensor()
        self.M = torch.nn.Parameter(M.detach().to(ref.device, ref.dtype).clone())
        self.R = torch.nn.Parameter(R.detach().to(ref.device, ref.dtype).clone())
        self.keep_mask = keep_mask.detach().to(ref.device, torch.bool).clone()
        self.centre_slot = centre_slot.detach().to(ref.device, torch.long).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys = [prefix + name for name in self.structure_keys]
        present = [k in state_dict for k in keys]
        if all(present):
            M, R, mask, slot = (state_dict[k] for k in keys)
            check_windowed_structure(M, R, mask, slot, where=prefix)
            if self.M is None or M.shape != self.M.shape or mask.shape != self.keep_mask.shape:
                self._install_windowed(torch.empty_like(M), torch.empty_like(R), mask, slot)
        elif any(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"state_dict: {prefix}M, R, keep_mask and centre_slot come together (a windowed PM "
                             f"structure), missing {', '.join(missing)}")
        elif self.M is not None and any(k.startswith(prefix) for k in state_dict):
            self.set_identity()  # a dense checkpoint: the identity structure
        super(PMBlockMixin, self)._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- running

    def reconstruct_matrix(self) -> torch.Tensor:
        """R with the columns of empty slots zero (structural zeros, kept so under training)."""
        return self.R * (self.centre_slot != EMPTY_SLOT).unsqueeze(1).to(self.R.dtype)

    def centre_positions(self, layout: WindowLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns), each (n_W, K): every merged token's centre, window-local in a windowed layer, on the
        image grid in a global one; −1 for an empty slot."""
        slot = self.centre_slot
        wh, ww = layout.window
        rows, cols = torch.div(slot, ww, rounding_mode="floor"), slot % ww
        if not self.pm_window:
            window = torch.arange(layout.num_windows, device=slot.device).unsqueeze(1)
            rows = rows + torch.div(window, layout.windows[1], rounding_mode="floor") * wh
            cols = cols + window % layout.windows[1] * ww
        empty = slot == EMPTY_SLOT
        return rows.masked_fill(empty, EMPTY_SLOT), cols.masked_fill(empty, EMPTY_SLOT)

    def pm_forward(self, x: torch.Tensor, extra=None) -> torch.Tensor:
        """x (B, H, W, C) → (B, H, W, C): the dense layer, or merge → body → reconstruct per window."""
        if self.M is None:
            return self.dense_forward(x)
        layout = self.checked_layout(x)
        z = self.body(torch.matmul(self.M.to(x.dtype), partition(x, layout)), layout)
        out = unpartition(torch.matmul(self.reconstruct_matrix().to(z.dtype), z), layout)
        return out + (~self.keep_mask).view(*layout.grid, 1).to(x.dtype) * x

    def body(self, z: torch.Tensor, layout: Optional[WindowLayout] = None) -> torch.Tensor:
        """The layer on its K tokens per window: z (B, n_W, K, C) → (B, n_W, K, C), ``layout`` the structure's."""
        if z.dim() != 4 or not isinstance(layout, WindowLayout):
            raise ValueError(f"z: a windowed layer's body takes (B, windows, K, C) tokens and their window layout, "
                             f"got shape {tuple(z.shape)} and {type(layout).__name__}")
        B, n_w, k, C = z.shape
        rows, cols = self.centre_positions(layout)
        h = self.pm_norm1(z)
        if self.pm_window:
            a = positional_attention(self.pm_attention, h.reshape(B * n_w, k, C), rows, cols, layout.window)
        else:
            a = positional_attention(self.pm_attention, h.reshape(B, n_w * k, C), rows.view(1, -1),
                                     cols.view(1, -1), layout.grid)
        z = z + self.pm_attention_branch(a.view(B, n_w, k, C))
        return z + self.pm_mlp_branch(z)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The library's layer on x (B, H, W, C), its attention through ``pm_kernels.attention`` (the score)."""
        attn = self.pm_attention
        h = self.pm_norm1(x)
        if self.pm_window:
            B, H, W, C = x.shape
            layout = window_layout((H, W), (self.pm_window, self.pm_window))
            windows = partition(h, layout).view(B * layout.num_windows, self.pm_window, self.pm_window, C)
            a = grid_attention(attn, windows, attn.score_accumulator, layout)
            a = unpartition(a.view(B, layout.num_windows, layout.slots, -1), layout)
        else:
            a = grid_attention(attn, h, attn.score_accumulator)
        x = x + self.pm_attention_branch(a)
        return x + self.pm_mlp_branch(x)

    def checked_layout(self, x: torch.Tensor) -> WindowLayout:
        """The structure layout of x's grid, after checking x against the installed structure (shapes only)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected float patch tokens of shape (B, H, W, C), got {got}")
        layout = self.structure_layout(tuple(x.shape[1:3]))
        self._check_layout(layout, self.M, self.keep_mask, "x")
        if x.device != self.M.device:
            raise ValueError(f"x: expected a tensor on {self.M.device} like the layer's M, got {x.device}")
        return layout

    @staticmethod
    def _check_layout(layout: WindowLayout, M: torch.Tensor, keep_mask: torch.Tensor, name: str) -> None:
        if keep_mask.numel() != layout.num_tokens or M.shape[0] != layout.num_windows or M.shape[2] != layout.slots:
            raise ValueError(f"{name}: this layer's structure has {keep_mask.numel()} tokens in {M.shape[0]} "
                             f"windows of {M.shape[2]} slots; a {layout.grid[0]}x{layout.grid[1]} grid has "
                             f"{layout.num_tokens} in {layout.num_windows} windows of {layout.slots}")
