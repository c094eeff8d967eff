"""The embedded end-to-end demo on scikit-learn's digits (no download), in a few minutes on a CPU.

1. a small ViT (32×32 grey, patch 4 → 64 patches + CLS) trained from scratch on the training split;
2. calibrated (SPEC §3) on training batches; 3. compressed (SPEC §2, §4) at each keep rate (0.6, 0.4);
4. fine-tuned with distillation from the dense model (SPEC §5; digits budget: short schedule, larger lr,
   no mixup/cutmix/smoothing); 5. evaluated on the held-out split (fixed seed): top-1, GFLOPs, images/s;
6. table printed, ``results.json``, ``accuracy_vs_keep.png`` and ``structure_keep*.png`` written to ``out``.
"""
import copy
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .data import cycle_batches, load_data, make_loader
from .evaluate import evaluate_models, format_table, plot_accuracy_vs_keep
from .finetune import TrainConfig, train
from .io import save_checkpoint, save_json, save_scores
from .model import DIGITS_VIT, DIGITS_VIT_KWARGS, build_model

__all__ = ["DemoConfig", "run_demo", "default_threads", "QUICK"]


def default_threads() -> int:
    """CPU threads for torch: the cores this process may use, less the current load, at least 1.

    On a shared, busy CPU, extra OpenMP threads spin against other processes and slow matmuls down several
    times over; one thread per free core avoids that.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


@dataclass
class DemoConfig:
    seed: int = 0
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    batch_size: int = 32
    dense_epochs: float = 16.0
    dense_lr: float = 2e-3
    dense_weight_decay: float = 0.05
    warmup_iters: int = 40
    calib_iters: int = 20
    keep_rates: Tuple[float, ...] = (0.6, 0.4)
    prune_rate: float = 0.1
    ft_epochs: float = 4.0
    ft_lr: float = 5e-4
    alpha: float = 0.8
    tau: float = 20.0
    speed_repeats: int = 5


QUICK = dict(dense_epochs=12.0, ft_epochs=2.0, calib_iters=8, keep_rates=(0.6,), speed_repeats=2)


def run_demo(out: str, cfg: Optional[DemoConfig] = None, device=None, progress: bool = True,
             log=print) -> Dict[str, object]:
    from ..calibrate import calibrate
    from ..compress import compress

    cfg = cfg or DemoConfig()
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)
    data = load_data("digits", seed=cfg.seed)
    kwargs = dict(DIGITS_VIT_KWARGS, **cfg.model_kwargs)
    log(f"digits: {len(data.train)} train / {len(data.test)} test images, 32x32; ViT embed {kwargs['embed_dim']}, "
        f"depth {kwargs['depth']}, heads {kwargs['num_heads']}; torch threads {torch.get_num_threads()}")

    dense = build_model(DIGITS_VIT, cfg.model_kwargs).to(device)
    meta = {"model": DIGITS_VIT, "model_kwargs": kwargs, "data": "digits", "seed": cfg.seed}
    t = time.perf_counter()
    hist = train(dense, data, TrainConfig(epochs=cfg.dense_epochs, batch_size=cfg.batch_size, lr=cfg.dense_lr,
                                          weight_decay=cfg.dense_weight_decay, warmup_iters=cfg.warmup_iters,
                                          alpha=0.0, seed=cfg.seed, progress=progress,
                                          freeze_structure=True), device=device)
    timings["train_dense_s"] = time.perf_counter() - t
    save_checkpoint(dense, os.path.join(out, "dense.pth"), dict(meta, stage="dense", train=hist))
    log(f"dense model trained: {cfg.dense_epochs:g} epochs in {timings['train_dense_s']:.1f} s")

    t = time.perf_counter()
    calib_loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed + 1)
    scores = calibrate(dense, ((x.to(device), y.to(device)) for x, y in cycle_batches(calib_loader, cfg.calib_iters)))
    timings["calibrate_s"] = time.perf_counter() - t
    save_scores(scores, os.path.join(out, "scores.pt"), dict(meta, iters=cfg.calib_iters))

    models = {"dense": dense}
    extra = {"dense": {"keep_rate": 1.0}}
    test_loader = make_loader(data.test, 256, train=False)
    from .evaluate import accuracy
    for keep in cfg.keep_rates:
        pm = copy.deepcopy(dense)
        compress(pm, scores, keep_rate=keep, prune_rate=cfg.prune_rate)
        before = accuracy(pm, test_loader, device)
        save_checkpoint(pm, os.path.join(out, f"pm_keep{keep:g}_init.pth"),
                        dict(meta, stage="compressed", keep_rate=keep, prune_rate=cfg.prune_rate))
        t = time.perf_counter()
        hist = train(pm, data, TrainConfig(epochs=cfg.ft_epochs, batch_size=cfg.batch_size, lr=cfg.ft_lr,
                                           alpha=cfg.alpha, tau=cfg.tau, seed=cfg.seed, progress=progress),
                     teacher=dense, device=device)
        timings[f"finetune_keep{keep:g}_s"] = time.perf_counter() - t
        save_checkpoint(pm, os.path.join(out, f"pm_keep{keep:g}.pth"),
                        dict(meta, stage="finetuned", keep_rate=keep, prune_rate=cfg.prune_rate, train=hist))
        name = f"PM keep {keep:g}"
        models[name] = pm
        extra[name] = {"keep_rate": keep, "top1_before_finetune": before}
        log(f"keep {keep:g}: top-1 {before:.2f} after compress; fine-tuned {cfg.ft_epochs:g} epochs in "
            f"{timings[f'finetune_keep{keep:g}_s']:.1f} s")

    t = time.perf_counter()
    rows = evaluate_models(models, test_loader, (1, 32, 32), device=device, batch_size=cfg.batch_size,
                           repeats=cfg.speed_repeats)
    for r in rows:
        r.update(extra[r["model"]])
    timings["evaluate_s"] = time.perf_counter() - t
    table = format_table(rows)
    log(table)

    from .visualize import render_structure
    image = data.test[0][0]
    plots = [plot_accuracy_vs_keep(rows, os.path.join(out, "accuracy_vs_keep.png"),
                                   title="digits ViT: Prune-and-Merge accuracy vs keep rate")]
    for keep in cfg.keep_rates:
        plots.append(render_structure(models[f"PM keep {keep:g}"], image, os.path.join(out, f"structure_keep{keep:g}.png"),
                                      data.mean, data.std, title=f"digits ViT, keep {keep:g}: centres (dots), "
                                      "merged (centre colour), pruned (black)"))
    timings["total_s"] = time.perf_counter() - t0
    results = {"config": asdict(cfg), "device": str(device), "threads": torch.get_num_threads(),
               "n_train": len(data.train), "n_test": len(data.test), "rows": rows, "table": table,
               "timings": timings, "files": [os.path.relpath(p, out) for p in plots]}
    save_json(results, os.path.join(out, "results.json"))
    log(f"demo finished in {timings['total_s']:.1f} s; results in {out}/results.json, plots "
        f"{', '.join(results['files'])}")
    return results
