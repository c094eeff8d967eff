"""PM variants tried on the digits frontier (issue 18): structure search and fine-tuning choices.

Each variant changes one thing against the baseline (the digits demo's PM: prune 0.1, depth discount 0.025,
20 calibration batches, SPEC §4 L2 score normalisation, every parameter at the recipe's lr). Peers are not
re-run for a variant: every variant keeps the recipe's epochs, lr schedule, teacher and data order, and only
touches what ToMe and EViT do not have (the structure search, M and R).

Nothing here is used at inference: a variant only decides the static structure (K per layer, pruned /
centre masks) or how M and R are fine-tuned, so a variant's model is an ordinary PM model. A variant is data:
the library's options it sets (``search_structure(score_norm=, thresholds=, ...)``, ``TrainConfig(mr_lr_mult=,
mr_warmup_iters=)``); nothing of the structure search or the training loop is written here.
"""
import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

from pm_kernels import LayerStructure, search_structure
from pm_kernels.pipeline.finetune import TrainConfig

__all__ = ["PMVariant", "VARIANTS", "BASELINE", "prune_rate_for", "variant_structure", "train_config",
           "timed_as"]

# prune rate as a function of the keep rate (name -> f(keep))
PRUNE_FUNCTIONS: Dict[str, Callable[[float], float]] = {
    # pruned tokens skip the block unchanged; at low keep, prune more instead of merging more into few centres
    "half_of_dropped": lambda keep: 0.5 * (1.0 - keep),
    "quarter_of_dropped": lambda keep: 0.25 * (1.0 - keep),
}


@dataclass(frozen=True)
class PMVariant:
    name: str
    prune_rate: object = 0.1            # a float, or a name in PRUNE_FUNCTIONS
    depth_discount: float = 0.025
    calib_iters: int = 20
    score_norm: str = "l2"              # l2 (SPEC §4) | l1 | max | none | rank | per_layer
    mr_lr_mult: float = 1.0             # M and R at this multiple of the recipe's lr
    mr_warmup_iters: int = 0            # linear warm-up of M and R's lr only
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


BASELINE = PMVariant("baseline", note="the digits demo's PM (SPEC defaults, calibration 20 batches)")

VARIANTS: Dict[str, PMVariant] = {v.name: v for v in [
    BASELINE,
    PMVariant("prune0", prune_rate=0.0, note="no pruning: every dropped token is merged"),
    PMVariant("prune0.05", prune_rate=0.05),
    PMVariant("prune0.2", prune_rate=0.2),
    PMVariant("prune0.3", prune_rate=0.3),
    PMVariant("prune_half", prune_rate="half_of_dropped", note="prune = (1 - keep) / 2"),
    PMVariant("prune_quarter", prune_rate="quarter_of_dropped", note="prune = (1 - keep) / 4"),
    PMVariant("dd0", depth_discount=0.0, note="no depth discount"),
    PMVariant("dd0.1", depth_discount=0.1, note="steeper depth discount (deep layers keep fewer)"),
    PMVariant("dd0.2", depth_discount=0.2, note="steeper still: layer factors 1, 0.8, 0.6, 0.4 for 4 blocks"),
    PMVariant("dd0.3", depth_discount=0.3, note="layer factors 1, 0.7, 0.4, 0.1 for 4 blocks"),
    PMVariant("calib5", calib_iters=5),
    PMVariant("calib100", calib_iters=100),
    PMVariant("norm_l1", score_norm="l1"),
    PMVariant("norm_max", score_norm="max"),
    PMVariant("norm_none", score_norm="none", note="raw scores: layers with larger scores keep more"),
    PMVariant("norm_rank", score_norm="rank", note="per-layer rank / P: scores' spread ignored"),
    PMVariant("per_layer", score_norm="per_layer", note="same K in every layer (no global thresholds)"),
    PMVariant("mr_lr3", mr_lr_mult=3.0),
    PMVariant("mr_lr10", mr_lr_mult=10.0),
    PMVariant("mr_lr0.3", mr_lr_mult=0.3),
    PMVariant("mr_warmup", mr_warmup_iters=40, note="M and R's lr warms up over the first epoch"),
    PMVariant("mr_lr30", mr_lr_mult=30.0),
    PMVariant("mr_lr10_prune_half", prune_rate="half_of_dropped", mr_lr_mult=10.0,
              note="the two best single changes of the keep 0.3 / 0.4 screening together"),
]}


def timed_as(variant: PMVariant) -> str:
    """The variant whose timing entries give this variant's speed: a variant that changes only how M and R are
    fine-tuned has the baseline's structure (same scores, same search), hence the baseline's speed."""
    structural = ("prune_rate", "depth_discount", "calib_iters", "score_norm")
    same = all(getattr(variant, f) == getattr(BASELINE, f) for f in structural)
    return BASELINE.name if same else variant.name


def prune_rate_for(variant: PMVariant, keep: float) -> float:
    """The variant's prune rate at this keep rate, capped at 1 − keep (SPEC §4 needs keep + prune <= 1)."""
    if isinstance(variant.prune_rate, str):
        rate = float(PRUNE_FUNCTIONS[variant.prune_rate](keep))
    else:
        rate = float(variant.prune_rate)
    return min(rate, round(1.0 - keep, 12))


def variant_structure(scores: torch.Tensor, keep: float, variant: PMVariant) -> List[LayerStructure]:
    """The per-layer structure of a variant: the library's ``search_structure`` with the variant's options
    (``score_norm="per_layer"`` is the per-layer search, SPEC §8, at the variant's prune rate)."""
    per_layer = variant.score_norm == "per_layer"
    return search_structure(scores, keep_rate=keep, prune_rate=prune_rate_for(variant, keep),
                            depth_discount=variant.depth_discount, thresholds="per_layer" if per_layer else "global",
                            score_norm="l2" if per_layer else variant.score_norm)


def train_config(variant: PMVariant, recipe: TrainConfig) -> TrainConfig:
    """The fine-tuning recipe with the variant's M and R options (the library's own training loop)."""
    return dataclasses.replace(recipe, mr_lr_mult=variant.mr_lr_mult, mr_warmup_iters=variant.mr_warmup_iters or None)
