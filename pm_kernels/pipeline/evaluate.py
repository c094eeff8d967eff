"""Evaluation, one for every task: its metrics, MACs and images/s of dense vs PM models on the same data, device,
batch and threads, every PM model in the form that is deployed.

- A compressed model is evaluated as ``pm_kernels.optimize`` folds it (the inference form ``export`` writes): its
  metrics are measured on that form, its MACs traced from it, its speed timed from it.
- MACs: ``FlopCounterMode`` on one image / 2 (``measure.macs.traced_macs``: 1 MAC = the paper's FLOP; DeiT-S 4.6).
- Speed: every model timed in the same interleaved rounds (``measure.timing``): images/s is the median over
  rounds, with the spread (min-max) and the rate per CPU-second; a speed-up is a ratio of two such medians of
  one call, printed next to the MAC ratio (dense MACs / the model's), its ceiling.
"""
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from ..measure.macs import traced_macs
from ..measure.timing import forward, time_interleaved
from ..optimize import optimize
from . import host
from .io import atomic_write

__all__ = ["deployable", "evaluate_models", "format_table", "markdown_table", "plot_accuracy_vs_keep"]


def deployable(model: nn.Module) -> nn.Module:
    """The inference form: ``optimize(model)`` for a compressed model (folded boundaries), else the model."""
    model.eval()
    return optimize(model) if host.is_compressed(model) else model


def evaluate_models(task, models: Mapping[str, nn.Module], data, device=None, batch_size: int = 64,
                    repeats: int = 5, min_time: float = 0.2, eval_batch_size: Optional[int] = None,
                    workers: int = 0, progress: bool = False, metric_options: Optional[Dict] = None,
                    log=None) -> List[Dict[str, object]]:
    """One row per model (the first with keep 1.0, else the first, is the reference): ``keep`` (mean K/N), the
    task's metrics, ``gmacs``, images/s (``measure.timing.Rates.to_dict``), ``speedup`` and ``cpu_speedup``
    against the reference, ``mac_ratio``, ``delta_<headline>``."""
    device = torch.device(device or "cpu")
    loader = task.eval_loader(data, eval_batch_size or batch_size, workers)
    rows, runners = [], {}
    for name, model in models.items():
        runner = deployable(model.to(device))
        runners[name] = runner
        example = torch.zeros(1, *host.input_shape(model), device=device)
        metrics = task.metrics(runner, loader, device, progress=progress, **(metric_options or {}))
        rows.append({"model": name, "keep": round(host.mean_keep(model), 3), **metrics,
                     "gmacs": traced_macs(runner, example) / 1e9, "timed": "optimize" if runner is not model else
                     "eager"})
    shape = host.input_shape(next(iter(models.values())))
    images = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    rates = time_interleaved({name: forward(r, images) for name, r in runners.items()}, items=batch_size,
                             rounds=repeats, min_time=min_time, warmup=2, device=device, log=log)
    reference = next((r for r in rows if r["keep"] == 1.0), rows[0])
    for r in rows:
        r.update(rates[r["model"]].to_dict())
    for r in rows:
        r[f"delta_{task.headline}"] = r[task.headline] - reference[task.headline]
        r["speedup"] = r["images_per_s"] / reference["images_per_s"]
        r["cpu_speedup"] = r["images_per_cpu_s"] / reference["images_per_cpu_s"]
        r["mac_ratio"] = reference["gmacs"] / r["gmacs"]
    return rows


def _macs_unit(rows) -> tuple:
    """MMACs for small models (the digits ViTs), GMACs otherwise: (title, scale, format)."""
    return ("MMACs", 1e3, ".2f") if max(r["gmacs"] for r in rows) < 1 else ("GMACs", 1.0, ".3f")


def format_table(task, rows: List[Dict[str, object]]) -> str:
    """The printed table: metrics, MACs and their ratio, images/s (median, min-max over rounds), speed-up."""
    unit, scale, fmt = _macs_unit(rows)
    extra = task.extra_columns
    head = (f"{'model':<14} {'keep K/N':>8} {task.headline_label:>8} {'Δ':>6} "
            + "".join(f"{title:>8} " for _, title, _ in extra)
            + f"{unit:>7} {'MAC ratio':>9} {'img/s':>7} {'(min-max)':>13} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["images_per_s_min"], r["images_per_s_max"]
        lines.append(f"{r['model']:<14} {r['keep']:>8.3f} {r[task.headline]:>8.2f} "
                     f"{r['delta_' + task.headline]:>+6.2f} "
                     + "".join(f"{r[key]:>8{f}} " for key, _, f in extra)
                     + f"{r['gmacs'] * scale:>7{fmt}} {r['mac_ratio']:>8.2f}x {r['images_per_s']:>7.0f} "
                       f"{f'({lo:.0f}-{hi:.0f})':>13} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def markdown_table(task, rows: List[Dict[str, object]]) -> str:
    """The same rows as a Markdown table (the README shows it; a test compares the two)."""
    unit, scale, fmt = _macs_unit(rows)
    titles = ["model", "keep K/N", task.headline_label, "Δ"] + [t for _, t, _ in task.extra_columns] + \
        [unit, "MAC ratio", "img/s (min-max)", "speed-up"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        cells = [r["model"], f"{r['keep']:.3f}", f"{r[task.headline]:.2f}", f"{r['delta_' + task.headline]:+.2f}"]
        cells += [f"{r[key]:{f}}".strip() for key, _, f in task.extra_columns]
        cells += [f"{r['gmacs'] * scale:{fmt}}", f"{r['mac_ratio']:.2f}×",
                  f"{r['images_per_s']:.0f} ({r['images_per_s_min']:.0f}–{r['images_per_s_max']:.0f})",
                  f"{r['speedup']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_keep(task, rows: List[Dict[str, object]], path: str, title: Optional[str] = None) -> str:
    """The headline metric vs keep rate (the requested ``keep_rate`` where known, else mean K/N); dense a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, label = task.headline, task.headline_label
    dense = [r for r in rows if r.get("keep_rate", r["keep"]) == 1.0 or r["keep"] == 1.0]
    pm = sorted((r for r in rows if r not in dense), key=lambda r: r.get("keep_rate", r["keep"]))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    if pm:
        ax.plot([r.get("keep_rate", r["keep"]) for r in pm], [r[metric] for r in pm], "o-", label="Prune-and-Merge")
        for r in pm:
            ax.annotate(f"{r[metric]:.1f}", (r.get("keep_rate", r["keep"]), r[metric]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    for r in dense:
        ax.plot([1.0], [r[metric]], "*", markersize=14, color="C3", label=f"dense ({r[metric]:.1f})")
        ax.axhline(r[metric], color="C3", lw=0.8, ls="--")
    ax.margins(y=0.2)
    ax.set_xlabel("keep rate")
    ax.set_ylabel(label)
    ax.set_title(title or f"{label} vs keep rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
