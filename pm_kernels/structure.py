"""Compression structure: which tokens each layer prunes, merges and keeps (SPEC §2, §4).

Tokens are P prefix tokens (CLS, distillation token, registers; P may be 0), then the patches in raster order.
Patch indices below are 0-based over the patches; column ``P + j`` of M is patch ``j``. Prefix tokens are never
pruned or merged: the first P rows of M and columns of R are the identity on them (SPEC §7).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ._checks import check_rate, check_tensor

__all__ = ["LayerStructure", "THRESHOLDS", "build_merge_matrix", "init_reconstruct", "search_structure", "identity_structure",
           "structure_matrices", "layer_matrices"]


@dataclass
class LayerStructure:
    """One layer's structure: bool masks over the patches, and K (tokens kept, the P prefix tokens included)."""

    pruned: torch.Tensor
    centres: torch.Tensor
    num_prefix: int = 1

    @property
    def keep(self) -> int:
        return int(self.centres.sum()) + self.num_prefix

    @property
    def merged(self) -> torch.Tensor:
        """Patches folded into a centre (neither pruned nor centre)."""
        return ~(self.pruned | self.centres)

    @property
    def keep_mask(self) -> torch.Tensor:
        """Length-N mask of the block (prefix tokens first): False where the token is pruned."""
        return torch.cat([self.pruned.new_ones(self.num_prefix), ~self.pruned])


def identity_structure(num_patches: int, num_prefix: int = 1) -> LayerStructure:
    """Every patch is a centre: M = I, R = I, keep_mask = 1."""
    return LayerStructure(pruned=torch.zeros(num_patches, dtype=torch.bool),
                          centres=torch.ones(num_patches, dtype=torch.bool), num_prefix=num_prefix)


def _check_grid(grid_size, num_patches: int) -> Tuple[int, int]:
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, int) and g > 0 for g in grid_size)):
        raise ValueError(f"grid_size: expected (h, w), two positive ints with h*w = {num_patches}, got {grid_size!r}")
    h, w = grid_size
    if h * w != num_patches:
        raise ValueError(f"grid_size: expected h*w = num_patches = {num_patches}, got {tuple(grid_size)} "
                         f"(h*w = {h * w})")
    return h, w


def build_merge_matrix(scores: torch.Tensor, pruned: torch.Tensor, centres: torch.Tensor,
                       grid_size: Sequence[int], num_prefix: int = 1) -> torch.Tensor:
    """Merge matrix M (K × N) of SPEC §2 from per-patch scores and the pruned / centre masks.

    Rows 0..P−1 are e_0..e_{P−1} (prefix tokens kept as they are; P = ``num_prefix``, 1 for a CLS token).
    Row P + i holds, over centre c_i's raster segment, M[P+i, P+j] = s_j / s_{c_i} (1 at the centre); pruned
    patches get 0. Rows are not normalised.
    """
    check_tensor("scores", scores, ndim=1, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="a float tensor of shape (num_patches,)")
    num_prefix = _check_num_prefix(num_prefix)
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

    if not centre_idx and num_prefix == 0:
        raise ValueError("centres: a model without prefix tokens needs at least one centre per layer (K >= 1)")
    P = num_prefix
    M = torch.zeros(len(centre_idx) + P, n_patches + P, dtype=torch.float64)
    M[:P, :P] = torch.eye(P, dtype=torch.float64)
    if centre_idx:
        # Vectorised §2 (N = 1601 in segmentation): each kept patch's row is the segment it falls in.
        centre = torch.tensor(centre_idx)
        ends = _segment_ends(centre, n_patches, width)
        owner = torch.searchsorted(ends, torch.arange(n_patches), right=True)  # start_i <= j < end_i
        cols = torch.nonzero((~pruned).cpu()).flatten()
        rows = owner[cols]
        M[rows + P, cols + P] = s[cols] / s[centre[rows]]
        M[torch.arange(len(centre_idx)) + P, centre + P] = 1.0
    return M.to(dtype=scores.dtype if scores.is_floating_point() else torch.float32, device=scores.device)


def _segment_ends(centre: torch.Tensor, num_patches: int, width: int) -> torch.Tensor:
    """Exclusive ends of the half-open raster segments, one per centre (sorted), partitioning the patches (SPEC §2).

    A segment ends at the midpoint ceil((c_i + c_{i+1}) / 2) toward the next centre, clipped at the end of
    c_i's image row; the next starts where it ended; the first starts at 0 and the last runs to the end.
    (The authors test the row with (c + 1) // width, clipping one row too far for a last-column centre:
    we clip at the true row end.)
    """
    ends = torch.full_like(centre, num_patches)
    if centre.numel() > 1:
        c, nxt = centre[:-1], centre[1:]
        ends[:-1] = torch.minimum(torch.div(c + nxt + 1, 2, rounding_mode="floor"), (c // width + 1) * width)
    return ends


def init_reconstruct(M: torch.Tensor) -> torch.Tensor:
    """R₀ = pinv(M) (N × K), computed in float64. A pruned token's row is then 0: it passes by the shortcut.

    A merge matrix of SPEC §2 has rows with disjoint supports (each patch belongs to one segment), so M Mᵀ is
    diagonal and pinv(M) = Mᵀ diag(1 / ‖m_i‖²) exactly: O(K·N) instead of an SVD (N = 1601: milliseconds
    instead of seconds per layer). Any other M goes through ``torch.linalg.pinv``.
    """
    check_tensor("M", M, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="shape (K, N)")
    if M.shape[0] > M.shape[1]:
        raise ValueError(f"M: expected shape (K, N) with K <= N, got {tuple(M.shape)}")
    m = M.detach().double()
    if bool(((m != 0).sum(0) <= 1).all()):
        norms = (m * m).sum(1)
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
        return (m.t() * inv).to(M.dtype)
    return torch.linalg.pinv(m).to(M.dtype)


def structure_matrices(structure: Sequence[LayerStructure], scores: torch.Tensor, grid_size: Sequence[int]
                       ) -> List[Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(M, R, keep_mask) per layer: M from the layer's scores (SPEC §2), R = pinv(M); None for a layer whose
    structure is the identity (every patch its own centre: nothing to merge, nothing to build)."""
    return [layer_matrices(st, scores[layer], grid_size) for layer, st in enumerate(structure)]


def layer_matrices(structure: LayerStructure, scores: torch.Tensor, grid_size: Sequence[int]
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(M, R, keep_mask) of one layer from its (num_patches,) scores; None for the identity structure."""
    if bool(structure.centres.all()):
        return None
    M = build_merge_matrix(scores.float(), structure.pruned.cpu(), structure.centres.cpu(), grid_size,
                           structure.num_prefix)
    return M, init_reconstruct(M), structure.keep_mask.cpu()


def _check_num_prefix(num_prefix) -> int:
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix: expected an int >= 0 (prefix tokens: CLS, distillation, registers), "
                         f"got {num_prefix!r}")
    return num_prefix


THRESHOLDS = ("global", "per_layer")
# How each layer's scores are scaled before the global thresholds: SPEC §4's L2 norm, or the alternatives measured
# on the digits frontier (bench/frontier/variants.py): L1, max, none (raw scores), rank (per-layer rank / P).
SCORE_NORMS = ("l2", "l1", "max", "none", "rank")


def _check_layers(layers, n_layers: int) -> List[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers: expected a sequence of block indices, got {type(layers).__name__}")
    layers = list(layers)
    if (not layers or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers for l in layers)
            or len(set(layers)) != len(layers)):
        raise ValueError(f"layers: expected distinct block indices in [0, {n_layers}), at least one, got {layers!r}")
    return sorted(layers)


def default_prune_rate(thresholds: str = "global") -> float:
    """The prune rate when none is given: 0.1 for the global search (SPEC §4, the authors' classification
    config), 0 for the per-layer one (SPEC §8, their segmentation config)."""
    return 0.0 if thresholds == "per_layer" else 0.1


def search_structure(scores: torch.Tensor, keep_rate: float = 0.6, prune_rate: Optional[float] = None,
                     depth_discount: float = 0.025, num_prefix: int = 1, *, thresholds: str = "global",
                     layers: Optional[Sequence[int]] = None, score_norm: str = "l2") -> List[LayerStructure]:
    """Per-layer structure from the calibration scores (L, num_patches).

    ``num_prefix``: the model's prefix tokens (never pruned or merged; 0 for a model without a CLS token).
    ``layers``: the blocks to compress (default all); the others get the identity structure (the dense block).

    ``thresholds="global"`` (SPEC §4, the classification default): over the L' compressed layers,
    Ŝ_l = (1 − depth_discount·l) · S_l / ‖S_l‖₂; τ_p is the ascending value at index int(num_patches·prune_rate)·L',
    τ_k the int(num_patches·keep_rate)·L'-th largest value. Ŝ < τ_p → pruned; Ŝ ≥ τ_k → centre; else merged.
    ``prune_rate`` defaults to 0.1.

    ``thresholds="per_layer"`` (SPEC §8, the authors' PM-Segmenter): each compressed layer has its own τ_p, τ_k
    (the same rule with L' = 1), so each keeps int(num_patches·keep_rate) centres and prunes
    int(num_patches·prune_rate) patches (ties aside). ``prune_rate`` defaults to 0, as the authors' config;
    ``depth_discount`` is not used (scaling a layer does not change its own ranking).

    ``score_norm``: the per-layer scaling of the global search, ``"l2"`` (SPEC §4) or ``"l1"``, ``"max"``,
    ``"none"``, ``"rank"`` (the per-layer rank / num_patches); the per-layer search does not depend on it.
    """
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 what="shape (L, num_patches): one score per layer and patch")
    num_prefix = _check_num_prefix(num_prefix)
    if thresholds not in THRESHOLDS:
        raise ValueError(f"thresholds: expected one of {', '.join(map(repr, THRESHOLDS))}, got {thresholds!r}")
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm: expected one of {', '.join(map(repr, SCORE_NORMS))}, got {score_norm!r}")
    per_layer = thresholds == "per_layer"
    keep_rate = check_rate("keep_rate", keep_rate)
    if prune_rate is None:
        prune_rate = default_prune_rate(thresholds)
    prune_rate = check_rate("prune_rate", prune_rate, low_open=False)
    if prune_rate + keep_rate > 1.0 + 1e-9:
        raise ValueError(f"prune_rate + keep_rate: expected <= 1, got {prune_rate} + {keep_rate}")
    if isinstance(depth_discount, bool) or not isinstance(depth_discount, (int, float)) or depth_discount < 0:
        raise ValueError(f"depth_discount: expected a float >= 0, got {depth_discount!r}")
    n_layers, n_patches = scores.shape
    if n_layers == 0 or n_patches == 0:
        raise ValueError(f"scores: expected shape (L, num_patches) with L, num_patches > 0, got {tuple(scores.shape)}")
    compressed = _check_layers(layers, n_layers)
    if not per_layer and depth_discount * (compressed[-1]) >= 1:
        raise ValueError(f"depth_discount: {depth_discount} × {compressed[-1]} (deepest compressed layer) = "
                         f"{depth_discount * compressed[-1]} would zero or flip its scores; expected < 1")
    s = scores.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores: expected finite values")

    discount = 1.0 - (0.0 if per_layer else depth_discount) * torch.arange(n_layers, dtype=torch.float64).unsqueeze(1)
    s_hat = discount * _normalised(s, score_norm)
    groups = [[layer] for layer in compressed] if per_layer else [compressed]
    taus = {}
    for group in groups:
        tau = _thresholds(s_hat[group], n_patches, keep_rate, prune_rate)
        taus.update({layer: tau for layer in group})

    structures = []
    for layer in range(n_layers):
        if layer not in taus:  # not compressed: every patch its own centre (installed as the dense block)
            structures.append(LayerStructure(pruned=torch.zeros(n_patches, dtype=torch.bool, device=scores.device),
                                             centres=torch.ones(n_patches, dtype=torch.bool, device=scores.device),
                                             num_prefix=num_prefix))
            continue
        tau_p, tau_k = taus[layer]
        pruned = s_hat[layer] < tau_p
        centres = (s_hat[layer] >= tau_k) & ~pruned
        if not bool(centres.any()) and (num_prefix == 0 or not bool(pruned.all())):
            # Not in the SPEC: a layer below τ_k everywhere would have merged tokens and no centre to merge
            # them into (tiny grids, steep depth discount), or, without prefix tokens, no token at all (K = 0):
            # its best unpruned patch (its best patch if all are pruned) becomes the centre.
            best = torch.where(pruned, -math.inf, s_hat[layer]).argmax() if not bool(pruned.all()) \
                else s_hat[layer].argmax()
            pruned[best] = False
            centres[best] = True
        structures.append(LayerStructure(pruned=pruned.to(scores.device), centres=centres.to(scores.device),
                                         num_prefix=num_prefix))
    return structures


def _normalised(s: torch.Tensor, how: str) -> torch.Tensor:
    """Each layer's (row's) scores scaled as ``score_norm`` says."""
    tiny = torch.finfo(torch.float64).tiny
    if how == "l2":
        return s / s.norm(dim=1, keepdim=True).clamp_min(tiny)
    if how == "l1":  # the digits frontier's definitions, as measured (bench/results/pareto_digits/variants)
        return s / s.sum(dim=1, keepdim=True)
    if how == "max":
        return s / s.amax(dim=1, keepdim=True)
    if how == "rank":
        return (s.argsort(dim=1).argsort(dim=1).double() + 1) / s.shape[1]
    return s / s.max()  # "none": one scale for all layers (the thresholds are scale-free)


def _thresholds(values: torch.Tensor, n_patches: int, keep_rate: float, prune_rate: float) -> Tuple[float, float]:
    """(τ_p, τ_k) over the L' rows of ``values``: the ascending value at int(n·prune_rate)·L' and the
    int(n·keep_rate)·L'-th largest value."""
    flat = values.flatten()
    ascending = flat.sort().values
    n_rows = values.shape[0]
    n_pruned = int(n_patches * prune_rate) * n_rows
    n_centres = int(n_patches * keep_rate) * n_rows
    tau_p = ascending[min(n_pruned, flat.numel() - 1)]
    tau_k = ascending[flat.numel() - n_centres] if n_centres > 0 else math.inf  # n_centres-th largest
    return tau_p, tau_k
