"""Evaluation: top-1 accuracy, GFLOPs per image and images/s, dense vs PM on the same data and device.

GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of one image (matmuls,
attention, convolutions: 2 FLOPs per multiply-add; the merge M·x and reconstruct R·z products included;
norms, activations and softmax excluded). The paper's "GFLOPs" (DeiT-S: 4.6) are fvcore multiply-accumulates:
half of ours; each row also carries ``gmacs`` in that unit. Images/s is the median of timed
no-grad forward passes after warm-up, same batch size and thread count for every model.
"""
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["accuracy", "gflops", "throughput", "evaluate_models", "format_table", "plot_accuracy_vs_keep",
           "mean_keep"]


@torch.no_grad()
def accuracy(model: nn.Module, loader, device=None, progress: bool = False) -> float:
    """Top-1 accuracy in percent."""
    from tqdm import tqdm

    device = torch.device(device or next(model.parameters()).device)
    model.to(device).eval()
    correct = total = 0
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == targets).sum())
        total += targets.numel()
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def gflops(model: nn.Module, input_shape: Sequence[int], device=None) -> float:
    """Forward GFLOPs for one image of shape ``input_shape`` (C, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    x = torch.zeros(1, *input_shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def throughput(model: nn.Module, input_shape: Sequence[int], batch_size: int = 64, device=None,
               warmup: int = 2, repeats: int = 5, min_time: float = 0.2) -> float:
    """Images per second of no-grad forward passes (median over ``repeats`` timed runs)."""
    device = torch.device(device or next(model.parameters()).device)
    model.to(device).eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    rates = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            model(x)
            n += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rates.append(n * batch_size / elapsed)
    return statistics.median(rates)


def mean_keep(model: nn.Module) -> float:
    """Mean fraction of tokens the blocks attend over (K / N), 1.0 for the dense model."""
    fracs = [1.0 if blk.is_identity else blk.M.shape[0] / blk.M.shape[1] for blk in model.blocks]
    return sum(fracs) / len(fracs)


def evaluate_models(models: Dict[str, nn.Module], loader, input_shape: Sequence[int], device=None,
                    batch_size: int = 64, progress: bool = False, repeats: int = 5) -> List[Dict[str, object]]:
    """One row per model: name, keep rate (mean K/N), top-1, GFLOPs, images/s (same data and device)."""
    rows = []
    for name, model in models.items():
        model.to(device or "cpu").eval()
        rows.append({"model": name, "keep": round(mean_keep(model), 3),
                     "top1": accuracy(model, loader, device, progress=progress),
                     "gflops": gflops(model, input_shape, device),
                     "gmacs": None,
                     "images_per_s": throughput(model, input_shape, batch_size, device, repeats=repeats)})
    dense = next((r for r in rows if r["keep"] == 1.0), rows[0])
    for r in rows:
        r["gmacs"] = r["gflops"] / 2
        r["delta_top1"] = r["top1"] - dense["top1"]
        r["speedup"] = r["images_per_s"] / dense["images_per_s"]
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    header = f"{'model':<18} {'keep K/N':>8} {'top-1 %':>8} {'Δtop-1':>7} {'MFLOPs':>8} {'img/s':>9} {'speed-up':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['keep']:>8.3f} {r['top1']:>8.2f} {r['delta_top1']:>+7.2f} "
                     f"{r['gflops'] * 1e3:>8.2f} {r['images_per_s']:>9.0f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def plot_accuracy_vs_keep(rows: List[Dict[str, object]], path: str, title: Optional[str] = None) -> str:
    """Top-1 vs keep rate (the requested ``keep_rate`` where known, else mean K/N); dense marked as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    dense = [r for r in rows if r.get("keep_rate", r["keep"]) == 1.0 or r["keep"] == 1.0]
    pm = sorted((r for r in rows if r not in dense), key=lambda r: r.get("keep_rate", r["keep"]))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    if pm:
        ax.plot([r.get("keep_rate", r["keep"]) for r in pm], [r["top1"] for r in pm], "o-", label="Prune-and-Merge")
        for r in pm:
            ax.annotate(f"{r['top1']:.1f}", (r.get("keep_rate", r["keep"]), r["top1"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    for r in dense:
        ax.plot([1.0], [r["top1"]], "*", markersize=14, color="C3", label=f"dense ({r['top1']:.1f})")
        ax.axhline(r["top1"], color="C3", lw=0.8, ls="--")
    ax.margins(y=0.2)
    ax.set_xlabel("keep rate")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs keep rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
