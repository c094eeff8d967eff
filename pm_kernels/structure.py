"""Compression structure: which tokens each layer prunes, merges and keeps (SPEC §2, §4).

Patch indices below are 0-based over the N−1 patches (CLS excluded), in raster order;
column ``j + 1`` of M is patch ``j`` (column 0 is CLS).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ._checks import check_rate, check_tensor

__all__ = ["LayerStructure", "build_merge_matrix", "init_reconstruct", "search_structure", "identity_structure",
           "structure_matrices"]


@dataclass
class LayerStructure:
    """One layer's structure: bool masks over the N−1 patches, and K (tokens kept, CLS included)."""

    pruned: torch.Tensor
    centres: torch.Tensor

    @property
    def keep(self) -> int:
        return int(self.centres.sum()) + 1

    @property
    def merged(self) -> torch.Tensor:
        """Patches folded into a centre (neither pruned nor centre)."""
        return ~(self.pruned | self.centres)

    @property
    def keep_mask(self) -> torch.Tensor:
        """Length-N mask of the block (CLS first): False where the token is pruned."""
        return torch.cat([self.pruned.new_ones(1), ~self.pruned])


def identity_structure(num_patches: int) -> LayerStructure:
    """Every patch is a centre: M = I, R = I, keep_mask = 1."""
    return LayerStructure(pruned=torch.zeros(num_patches, dtype=torch.bool),
                          centres=torch.ones(num_patches, dtype=torch.bool))


def _check_grid(grid_size, num_patches: int) -> Tuple[int, int]:
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, int) and g > 0 for g in grid_size)):
        raise ValueError(f"grid_size: expected (h, w), two positive ints with h*w = {num_patches}, got {grid_size!r}")
    h, w = grid_size
    if h * w != num_patches:
        raise ValueError(f"grid_size: expected h*w = N-1 = {num_patches}, got {tuple(grid_size)} (h*w = {h * w})")
    return h, w


def _segments(centres: List[int], num_patches: int, width: int) -> List[Tuple[int, int]]:
    """Half-open raster segments [start, end), one per centre, partitioning the patches (SPEC §2).

    A segment ends at the midpoint ceil((c_i + c_{i+1}) / 2) toward the next centre, clipped at the end of
    c_i's image row; the next starts where it ended; the first starts at 0 and the last runs to the end.
    (The authors test the row with (c + 1) // width, clipping one row too far for a last-column centre:
    we clip at the true row end.)
    """
    segments, start = [], 0
    for i, c in enumerate(centres):
        if i + 1 < len(centres):
            end = min(math.ceil((c + centres[i + 1]) / 2), (c // width + 1) * width)
        else:
            end = num_patches
        segments.append((start, end))
        start = end
    return segments


def build_merge_matrix(scores: torch.Tensor, pruned: torch.Tensor, centres: torch.Tensor,
                       grid_size: Sequence[int]) -> torch.Tensor:
    """Merge matrix M (K × N) of SPEC §2 from per-patch scores and the pruned / centre masks.

    Row 0 is e_0 (CLS kept as is). Row i ≥ 1 holds, over centre c_i's raster segment,
    M[i, j+1] = s_j / s_{c_i} (1 at the centre); pruned patches get 0. Rows are not normalised.
    """
    check_tensor("scores", scores, ndim=1, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="a float tensor of shape (N-1,)")
    n_patches = scores.shape[0]
    check_tensor("pruned", pruned, ndim=1, dtypes=(torch.bool,), shape=(n_patches,),
                 what=f"a bool tensor of shape ({n_patches},) like scores")
    check_tensor("centres", centres, ndim=1, dtypes=(torch.bool,), shape=(n_patches,),
                 what=f"a bool tensor of shape ({n_patches},) like scores")
    _, width = _check_grid(grid_size, n_patches)
    if bool((pruned & centres).any()):
        raise ValueError("centres: a patch cannot be both pruned and a centre")
    s = scores.detach().double().cpu()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("scores: expected finite, non-negative values")
    centre_idx = torch.nonzero(centres.cpu()).flatten().tolist()
    merged = (~(pruned | centres)).cpu()
    if not centre_idx and bool(merged.any()):
        raise ValueError("centres: at least one centre is needed when some patches are merged (not pruned)")
    if centre_idx and bool((s[centre_idx] <= 0).any()):
        raise ValueError("scores: every centre needs a positive score (merge weights are s_j / s_centre)")

    M = torch.zeros(len(centre_idx) + 1, n_patches + 1, dtype=torch.float64)
    M[0, 0] = 1.0
    keep = (~pruned).cpu()
    for row, (c, (start, end)) in enumerate(zip(centre_idx, _segments(centre_idx, n_patches, width)), start=1):
        cols = torch.arange(start, end)
        cols = cols[keep[start:end]]
        M[row, cols + 1] = s[cols] / s[c]
        M[row, c + 1] = 1.0
    return M.to(dtype=scores.dtype if scores.is_floating_point() else torch.float32, device=scores.device)


def init_reconstruct(M: torch.Tensor) -> torch.Tensor:
    """R₀ = pinv(M) (N × K), computed in float64. A pruned token's row is then 0: it passes by the shortcut."""
    check_tensor("M", M, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="shape (K, N)")
    if M.shape[0] > M.shape[1]:
        raise ValueError(f"M: expected shape (K, N) with K <= N, got {tuple(M.shape)}")
    return torch.linalg.pinv(M.detach().double()).to(M.dtype)


def structure_matrices(structure: Sequence[LayerStructure], scores: torch.Tensor,
                       grid_size: Optional[Sequence[int]], default_grid: Sequence[int]
                       ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(M, R, keep_mask) per layer: M from the layer's scores (SPEC §2), R = pinv(M), keep_mask."""
    grid = tuple(default_grid) if grid_size is None else grid_size
    matrices = []
    for layer, st in enumerate(structure):
        M = build_merge_matrix(scores[layer].float(), st.pruned.cpu(), st.centres.cpu(), grid)
        matrices.append((M, init_reconstruct(M), st.keep_mask.cpu()))
    return matrices


def search_structure(scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: float = 0.1,
                     depth_discount: float = 0.025) -> List[LayerStructure]:
    """Per-layer structure from the calibration scores (L, N−1), by global thresholds (SPEC §4).

    Ŝ_l = (1 − depth_discount·l) · S_l / ‖S_l‖₂; τ_p is the ascending value at index int((N−1)·prune_rate)·L,
    τ_k the int((N−1)·keep_rate)·L-th largest value. Ŝ < τ_p → pruned; Ŝ ≥ τ_k → centre; else merged.
    """
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="shape (L, N-1): one score per layer and patch")
    keep_rate = check_rate("keep_rate", keep_rate)
    prune_rate = check_rate("prune_rate", prune_rate, low_open=False)
    if prune_rate + keep_rate > 1.0 + 1e-9:
        raise ValueError(f"prune_rate + keep_rate: expected <= 1, got {prune_rate} + {keep_rate}")
    if isinstance(depth_discount, bool) or not isinstance(depth_discount, (int, float)) or depth_discount < 0:
        raise ValueError(f"depth_discount: expected a float >= 0, got {depth_discount!r}")
    n_layers, n_patches = scores.shape
    if n_layers == 0 or n_patches == 0:
        raise ValueError(f"scores: expected shape (L, N-1) with L, N-1 > 0, got {tuple(scores.shape)}")
    if depth_discount * (n_layers - 1) >= 1:
        raise ValueError(f"depth_discount: {depth_discount} × (L-1) = {depth_discount * (n_layers - 1)} "
                         "would zero or flip the deepest layers' scores; expected < 1")
    s = scores.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores: expected finite values")

    norms = s.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    discount = 1.0 - depth_discount * torch.arange(n_layers, dtype=torch.float64).unsqueeze(1)
    s_hat = discount * s / norms

    flat = s_hat.flatten()
    ascending = flat.sort().values
    n_pruned = int(n_patches * prune_rate) * n_layers
    n_centres = int(n_patches * keep_rate) * n_layers
    tau_p = ascending[min(n_pruned, flat.numel() - 1)]
    tau_k = ascending[flat.numel() - n_centres] if n_centres > 0 else math.inf  # n_centres-th largest

    structures = []
    for layer in range(n_layers):
        pruned = s_hat[layer] < tau_p
        centres = (s_hat[layer] >= tau_k) & ~pruned
        if not bool(centres.any()) and not bool(pruned.all()):
            # Not in the SPEC: a layer below τ_k everywhere would have merged tokens and no centre to merge
            # them into (tiny grids, steep depth discount); its best unpruned patch becomes the centre.
            centres[torch.where(pruned, -math.inf, s_hat[layer]).argmax()] = True
        structures.append(LayerStructure(pruned=pruned.to(scores.device), centres=centres.to(scores.device)))
    return structures
