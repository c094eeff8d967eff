"""Structure search to a compute budget: the keep rate whose PM model does a target number of GMACs.

Users think in budgets ("0.6× the dense MACs"), the structure search (SPEC §4) in keep rates. The keep rate
enters the search only as ``n_centres = int(P · keep_rate) · L`` (P patch tokens, L layers), so the reachable
budgets are a staircase with ``P(1 − prune_rate)`` steps; ``budget_keep_rate`` walks it by bisection (MACs
grow with the centre count) and returns the arguments for ``compress`` that land nearest the target.
One step moves every layer's K by about one token: about 1/P of the compressible MACs (0.5 % for DeiT at 224,
a few % for the 64-patch digits ViT), so a target is met to within half a step.

MACs (1 multiply-accumulate = 1 FLOP, the literature's GFLOPs; ``FlopCounterMode`` FLOPs / 2): the patch
embedding, every linear map inside a layer on K tokens (qkv, projection, MLP of any width or gating), the
attention products 2·K²·(heads · head dim), the merge and reconstruct products 2·K·N·C of a compressed layer
(an identity layer, K = N, is a plain layer without them), and the head's linear layers on the token(s) it
reads; norms, activations, softmax and rotary embeddings are not counted. The model's host says what each part
is (``Host.embed_macs``, ``layer_macs_per_token``, ``attention_width``, ``head_macs``).
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ._checks import check_rate
from .hosts import host_of
from .measure.macs import grid_of_count, pm_macs
from .structure import LayerStructure, default_prune_rate, search_structure

__all__ = ["BudgetResult", "pm_macs", "budget_keep_rate"]


@dataclass
class BudgetResult:
    """What ``compress`` needs (``keep_rate``, ``prune_rate``, ``depth_discount``) and where it landed."""

    keep_rate: float
    prune_rate: float
    depth_discount: float
    gmacs: float
    target_gmacs: float
    kept: List[int]
    thresholds: str = "global"
    layers: Optional[List[int]] = None

    @property
    def relative_error(self) -> float:
        return (self.gmacs - self.target_gmacs) / self.target_gmacs

    def compress_kwargs(self) -> dict:
        return {"keep_rate": self.keep_rate, "prune_rate": self.prune_rate, "depth_discount": self.depth_discount,
                "thresholds": self.thresholds, "layers": self.layers}


def budget_keep_rate(scores: torch.Tensor, model_or_macs: Union[nn.Module, Callable[[List[LayerStructure]], float]],
                     target_gmacs: float, prune_rate: Optional[float] = None, depth_discount: float = 0.025,
                     num_prefix: Optional[int] = None, *, thresholds: str = "global",
                     layers: Optional[Sequence[int]] = None) -> BudgetResult:
    """The keep rate whose structure (``search_structure(scores, keep_rate, prune_rate, depth_discount,
    thresholds=, layers=)``, the same arguments as ``compress``) does the GMACs nearest ``target_gmacs``.

    model_or_macs: the ViT to be compressed (MACs by ``pm_macs``), or a function of the structure (one
    ``LayerStructure`` per layer) returning its GMACs, e.g. a latency model.
    num_prefix: the prefix tokens (default the model's; 1 with a function).
    Raises ValueError when the target is outside what the keep rates reach at this prune rate.
    """
    if isinstance(target_gmacs, bool) or not isinstance(target_gmacs, (int, float)) or not target_gmacs > 0 \
            or not math.isfinite(target_gmacs):
        raise ValueError(f"target_gmacs: expected a positive number of GMACs, got {target_gmacs!r}")
    if prune_rate is None:
        prune_rate = default_prune_rate(thresholds)
    prune_rate = check_rate("prune_rate", prune_rate, low_open=False)
    kept_of = lambda st: [s.keep for s in st]  # noqa: E731
    if isinstance(model_or_macs, nn.Module):
        model = model_or_macs
        host = host_of(model)
        if num_prefix is None:
            num_prefix = host.num_prefix(model)
        # tokens each layer runs on (a windowed layer's K per window, times its windows)
        kept_of = lambda st: host.kept_tokens(model, st, grid_of_count(model, scores.shape[1]))  # noqa: E731
        gmacs_of = lambda st: pm_macs(model, kept_of(st), scores.shape[1]) / 1e9  # noqa: E731
    elif callable(model_or_macs):
        gmacs_of = model_or_macs
    else:
        raise TypeError(f"model_or_macs: expected a ViT or a function of the structure, "
                        f"got {type(model_or_macs).__name__}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores: expected a tensor of shape (L, num_patches), got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    n_patches = scores.shape[1]
    if num_prefix is None:
        num_prefix = 1

    def keep_for(centres: int) -> float:
        # a keep rate with int(P · keep) == centres exactly (no float round-down), within keep + prune <= 1
        return min((centres + 0.25) / n_patches, 1.0 - prune_rate)

    counts = [c for c in range(1, n_patches + 1) if int(n_patches * keep_for(c)) == c]
    if not counts:
        raise ValueError(f"prune_rate: {prune_rate} leaves no room for a centre among {n_patches} patches")
    cache = {}

    def evaluate(i: int):
        if i not in cache:
            st = search_structure(scores, keep_rate=keep_for(counts[i]), prune_rate=prune_rate,
                                  depth_discount=depth_discount, num_prefix=num_prefix, thresholds=thresholds,
                                  layers=layers)
            cache[i] = (float(gmacs_of(st)), kept_of(st))
        return cache[i]

    lo_g, hi_g = evaluate(0)[0], evaluate(len(counts) - 1)[0]
    step = (hi_g - lo_g) / max(1, len(counts) - 1)
    if not lo_g - step / 2 <= target_gmacs <= hi_g + step / 2:
        raise ValueError(f"target_gmacs: {target_gmacs:.6g} is outside what keep rates reach at prune_rate "
                         f"{prune_rate:g}: {lo_g:.6g} to {hi_g:.6g} GMACs")
    lo, hi = 0, len(counts) - 1             # invariant: the first count at or above the target is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid)[0] >= target_gmacs:
            hi = mid
        else:
            lo = mid + 1
    best = min({lo, max(0, lo - 1)}, key=lambda i: abs(evaluate(i)[0] - target_gmacs))
    g, kept = evaluate(best)
    return BudgetResult(keep_rate=keep_for(counts[best]), prune_rate=prune_rate, depth_discount=depth_discount,
                        gmacs=g, target_gmacs=float(target_gmacs), kept=kept, thresholds=thresholds,
                        layers=None if layers is None else list(layers))
