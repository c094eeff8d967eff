"""PM variants tried on the digits frontier (issue 18): structure search and fine-tuning choices.

Each variant changes one thing against the baseline (the digits demo's PM: prune 0.1, depth discount 0.025,
20 calibration batches, SPEC §4 L2 score normalisation, every parameter at the recipe's lr). Peers are not
re-run for a variant: every variant keeps the recipe's epochs, lr schedule, teacher and data order, and only
touches what ToMe and EViT do not have (the structure search, M and R).

Nothing here is used at inference: a variant only decides the static structure (K per layer, pruned /
centre masks) or how M and R are fine-tuned, so a variant's model is an ordinary PM model.
"""
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from pm_kernels import LayerStructure, search_structure
from pm_kernels.pipeline.data import make_loader
from pm_kernels.pipeline.finetune import DistillationLoss, TrainConfig, _lr_at, param_groups

__all__ = ["PMVariant", "VARIANTS", "BASELINE", "prune_rate_for", "variant_structure", "finetune_pm",
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


def _normalise(s: torch.Tensor, how: str) -> torch.Tensor:
    if how == "l2":
        return s / s.norm(dim=1, keepdim=True)
    if how == "l1":
        return s / s.sum(dim=1, keepdim=True)
    if how == "max":
        return s / s.amax(dim=1, keepdim=True)
    if how == "none":
        return s / s.max()                      # one global scale: the thresholds are scale-free anyway
    if how == "rank":
        return (s.argsort(dim=1).argsort(dim=1).double() + 1) / s.shape[1]
    raise ValueError(f"score_norm: expected l2, l1, max, none, rank or per_layer, got {how!r}")


def variant_structure(scores: torch.Tensor, keep: float, variant: PMVariant) -> List[LayerStructure]:
    """The per-layer structure of a variant. ``l2`` is the library's ``search_structure``; the others follow
    SPEC §4 (global thresholds, depth discount) with another per-layer normalisation, or per-layer counts."""
    prune = prune_rate_for(variant, keep)
    if variant.score_norm == "l2":
        return search_structure(scores, keep_rate=keep, prune_rate=prune, depth_discount=variant.depth_discount)
    s = scores.detach().double().cpu()
    n_layers, n_patches = s.shape
    if variant.score_norm == "per_layer":
        out = []
        for layer in range(n_layers):
            order = s[layer].argsort()
            pruned = torch.zeros(n_patches, dtype=torch.bool)
            pruned[order[:int(n_patches * prune)]] = True
            centres = torch.zeros(n_patches, dtype=torch.bool)
            centres[order[n_patches - max(1, int(n_patches * keep)):]] = True
            out.append(LayerStructure(pruned=pruned & ~centres, centres=centres))
        return out
    discount = 1.0 - variant.depth_discount * torch.arange(n_layers, dtype=torch.float64).unsqueeze(1)
    s_hat = discount * _normalise(s, variant.score_norm)
    flat = s_hat.flatten()
    ascending = flat.sort().values
    n_pruned = int(n_patches * prune) * n_layers
    n_centres = int(n_patches * keep) * n_layers
    tau_p = ascending[min(n_pruned, flat.numel() - 1)]
    tau_k = ascending[flat.numel() - n_centres] if n_centres > 0 else math.inf
    out = []
    for layer in range(n_layers):
        pruned = s_hat[layer] < tau_p
        centres = (s_hat[layer] >= tau_k) & ~pruned
        if not bool(centres.any()) and not bool(pruned.all()):
            centres[torch.where(pruned, -math.inf, s_hat[layer]).argmax()] = True
        out.append(LayerStructure(pruned=pruned, centres=centres))
    return out


def finetune_pm(model, data, cfg: TrainConfig, teacher, mr_lr_mult: float = 1.0, mr_warmup_iters: int = 0,
                device: Optional[torch.device] = None) -> Dict[str, object]:
    """``pm_kernels.pipeline.finetune.train`` (single process, no mixup / AMP) with M and R in their own
    optimizer group: lr × ``mr_lr_mult`` and their own linear warm-up. With the defaults it follows ``train``
    step for step (same loader seed, loss, groups, schedule): tests/test_frontier.py checks the weights match."""
    device = torch.device(device or "cpu")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(label_smoothing=cfg.smoothing), teacher,
                                 alpha=cfg.alpha, tau=cfg.tau)
    loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed, workers=cfg.workers)
    lr = cfg.scaled_lr(1)
    groups = param_groups(model, lr, cfg.weight_decay, cfg.authors_lr_quirk)
    mr = {id(p) for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] in ("M", "R")}
    mr_params = [p for g in groups for p in g["params"] if id(p) in mr]
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in mr]
        g["warmup"] = cfg.warmup_iters
    if mr_params:
        groups.insert(1, {"params": mr_params, "weight_decay": cfg.weight_decay, "lr": lr * mr_lr_mult,
                          "base_lr": lr * mr_lr_mult, "warmup": mr_warmup_iters or cfg.warmup_iters})
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    total = max(1, int(round(cfg.epochs * len(loader))))
    step, epoch_loss = 0, []
    while step < total:
        running, count = 0.0, 0
        for images, targets in loader:
            if step >= total:
                break
            images, targets = images.to(device), targets.to(device)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(step, total, g["base_lr"], min(cfg.min_lr, g["base_lr"]), g["warmup"])
            loss = criterion(images, model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count, step = running + loss.item(), count + 1, step + 1
        epoch_loss.append(running / max(1, count))
    model.eval()
    return {"iterations": total, "epoch_loss": epoch_loss, "mr_lr_mult": mr_lr_mult,
            "mr_warmup_iters": mr_warmup_iters}

