"""Cheap screening of PM structure variants: top-1 right after ``compress`` (no fine-tuning) and GMACs, for every
seed whose dense model and scores are cached, every structure variant and keep rate. Seconds per model instead
of minutes: it ranks structures before the fine-tuning runs decide (the fine-tuned top-1 is the result;
this is only a filter)."""
import copy
import statistics
from typing import Dict, Sequence

from pm_kernels import install_structure, patch_timm
from pm_kernels.measure import analytic_macs
from pm_kernels.pipeline.data import make_loader
from pm_kernels.pipeline.tasks.classification import accuracy

from .accuracy import dense_and_scores
from .variants import VARIANTS, variant_structure

__all__ = ["screen"]

STRUCTURE_FIELDS = ("prune_rate", "depth_discount", "calib_iters", "score_norm")


def screen(seeds: Sequence[int], keeps: Sequence[float], work: str, names=None, log=print) -> Dict[str, dict]:
    base = VARIANTS["baseline"]
    # variants that change only the fine-tuning give the baseline's structure: nothing to screen
    names = names or [n for n, v in VARIANTS.items()
                      if n == "baseline" or any(getattr(v, f) != getattr(base, f) for f in STRUCTURE_FIELDS)]
    out: Dict[str, dict] = {}
    for seed in seeds:
        for name in names:
            v = VARIANTS[name]
            dense_pm, scores, data = dense_and_scores(seed, work, v.calib_iters, log)
            loader = make_loader(data.test, 256, train=False)
            for keep in keeps:
                pm = copy.deepcopy(dense_pm)
                st = variant_structure(scores, keep, v)
                install_structure(patch_timm(pm), st, scores)
                entry = out.setdefault(name, {}).setdefault(f"keep {keep:g}", {"top1": [], "gmacs": [], "K": []})
                entry["top1"].append(accuracy(pm.eval(), loader, "cpu"))
                entry["gmacs"].append(analytic_macs(pm) / 1e9)
                entry["K"].append([s.keep for s in st])
    for name, per_keep in out.items():
        for e in per_keep.values():
            e["top1_mean"] = statistics.mean(e["top1"])
            e["gmacs_mean"] = statistics.mean(e["gmacs"])
    return out


def format_screen(result: Dict[str, dict]) -> str:
    keeps = sorted({k for v in result.values() for k in v}, key=lambda k: float(k.split()[1]))
    lines = [f"{'variant':<14}" + "".join(f"{k:>16}" for k in keeps) + "   (top-1 before fine-tuning, mean; GMACs)"]
    for name, per_keep in result.items():
        lines.append(f"{name:<14}" + "".join(
            f"{per_keep[k]['top1_mean']:>8.2f} {per_keep[k]['gmacs_mean'] * 1e3:>6.2f}m" if k in per_keep else " " * 16
            for k in keeps))
    return "\n".join(lines)
