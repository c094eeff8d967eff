"""A windowed layer's structure (docs/windowed_attention.md §1, §3): per window ω, M_ω (K × S), R_ω (S × K) over
the window's S slots, the same K in every window, and each merged token's centre slot.

From a layer's searched ``LayerStructure`` (SPEC §4 over all patches: its centre count c_l, its pruned patches):
every window keeps K = max(1, round(c_l / n_W)) centres (at most the fullest window's real tokens), its K
highest-scored unpruned real tokens; the rest of its unpruned tokens merge into them by SPEC §2's segment rule on
the window's own grid of real tokens; a window with fewer unpruned tokens than K fills its rows with empty slots
(zero rows of M, zero columns of R, centre slot −1); a window whose every token was pruned keeps its best one as
its centre (one real key in every window: no attention row of a compressed block is all −inf).
"""
from typing import Tuple

import torch

from .._checks import FLOAT_DTYPES, check_tensor
from ..structure import LayerStructure, build_merge_matrix, init_reconstruct
from .layout import WindowLayout

__all__ = ["window_keep", "windowed_structure", "check_windowed_structure", "EMPTY_SLOT"]

EMPTY_SLOT = -1  # centre slot of an empty row


def window_keep(num_centres: int, layout: WindowLayout) -> int:
    """K of a windowed layer whose search kept ``num_centres`` centres: spread evenly over the windows."""
    return min(max(1, round(num_centres / layout.num_windows)), layout.max_real)


def windowed_structure(structure: LayerStructure, scores: torch.Tensor, layout: WindowLayout
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M (n_W, K, S), R (n_W, S, K) float64, keep_mask bool (N,), centre_slot int64 (n_W, K)) of one layer."""
    if structure.num_prefix != 0:
        raise ValueError(f"structure: a windowed layer has no prefix tokens; expected num_prefix=0, got "
                         f"{structure.num_prefix}")
    n = layout.num_tokens
    if structure.pruned.numel() != n or scores.shape != (n,):
        raise ValueError(f"scores: expected one score per patch of the {layout.grid[0]}x{layout.grid[1]} grid "
                         f"({n}), got {tuple(scores.shape)} scores and {structure.pruned.numel()} patches")
    scores = scores.detach().double().cpu()
    keep = window_keep(int(structure.centres.sum()), layout)
    pruned_all = structure.pruned.cpu().clone()
    M = torch.zeros(layout.num_windows, keep, layout.slots, dtype=torch.float64)
    R = torch.zeros(layout.num_windows, layout.slots, keep, dtype=torch.float64)
    centre_slot = torch.full((layout.num_windows, keep), EMPTY_SLOT, dtype=torch.long)
    for window in range(layout.num_windows):
        tokens, slots = layout.window_tokens(window)
        s, pruned = scores[tokens], pruned_all[tokens]
        if bool(pruned.all()):  # keep the window's best token: one real key per window
            best = int(torch.argmax(s))
            pruned[best] = False
            pruned_all[tokens[best]] = False
        candidates = torch.nonzero(~pruned).flatten()
        ranked = candidates[torch.sort(s[candidates], descending=True, stable=True).indices][:keep]
        centres = torch.zeros_like(pruned)
        centres[ranked] = True
        M_w = build_merge_matrix(s, pruned, centres, layout.window_grid(window), num_prefix=0)
        count = M_w.shape[0]
        M[window, :count, slots] = M_w
        R[window, slots, :count] = init_reconstruct(M_w)
        centre_slot[window, :count] = slots[torch.nonzero(centres).flatten()]
    return M, R, ~pruned_all, centre_slot


def check_windowed_structure(M, R, keep_mask, centre_slot, where: str = "", values: bool = True) -> None:
    """A windowed layer's structure, checked where it changes (install, checkpoint load): M (n_W, K, S) and R
    (n_W, S, K) float with 1 <= K <= S, finite; centre_slot int64 (n_W, K) in [−1, S); keep_mask bool (N,) with
    N <= n_W·S."""
    check_tensor(f"{where}M", M, ndim=3, dtypes=FLOAT_DTYPES, what="shape (windows, K, slots)")
    n_w, k, s = M.shape
    if not 1 <= k <= s:
        raise ValueError(f"{where}M: expected shape (windows, K, slots) with 1 <= K <= slots, got {tuple(M.shape)}")
    check_tensor(f"{where}R", R, ndim=3, dtypes=FLOAT_DTYPES, shape=(n_w, s, k),
                 what=f"shape ({n_w}, {s}, {k}) (windows, slots, K) like M's")
    check_tensor(f"{where}centre_slot", centre_slot, ndim=2, dtypes=(torch.int64,), shape=(n_w, k),
                 what=f"shape ({n_w}, {k}) (windows, K) like M's")
    check_tensor(f"{where}keep_mask", keep_mask, ndim=1, dtypes=(torch.bool,),
                 what=f"a bool tensor of shape (N,) with N <= {n_w * s}")
    if keep_mask.numel() > n_w * s:
        raise ValueError(f"{where}keep_mask: expected at most {n_w * s} tokens ({n_w} windows of {s} slots), "
                         f"got {keep_mask.numel()}")
    devices = {t.device for t in (M, R, keep_mask, centre_slot)}
    if len(devices) > 1:
        raise ValueError(f"{where}M: expected M, R, keep_mask and centre_slot on one device, got "
                         f"{', '.join(map(str, devices))}")
    if not values or M.device.type == "meta":
        return
    low, high = int(centre_slot.min()), int(centre_slot.max())
    if low < EMPTY_SLOT or high >= s:
        raise ValueError(f"{where}centre_slot: expected slots in [-1, {s}) (-1: an empty row), got values in "
                         f"[{low}, {high}]")
    for name, t in ((f"{where}M", M), (f"{where}R", R)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values")
