"""The embedded segmentation demo (``pm-kernels demo --task segmentation``): digits canvases, no download.

1. a Segmenter (mask decoder) on a small ViT (32×32 grey, patch 4 → 64 patches + CLS, 4 blocks) trained from
   scratch;
2. calibrated (SPEC §3, per-pixel cross-entropy); 3. compressed at keep 0.8, 0.7, 0.5 with the SPEC §8
   per-layer structure (each block keeps int(keep·64) centres, no pruning, no depth discount);
4. fine-tuned with per-pixel distillation from the dense model (KL at temperature T, α); 5. evaluated on the
   fixed validation canvases: mIoU, pixel accuracy, GMACs, images/s (PM through ``optimize``: the folded
   inference path, all patch tokens at the exit);
6. table printed, ``results.json``, ``predictions.png`` (image / ground truth / dense / PM) and
   ``structure_keep*.png`` (centres, merged, pruned patches over a canvas) written to ``out``.
"""
import copy
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..segmenter import IGNORE_INDEX, pixel_cross_entropy
from .data import cycle_batches, make_loader
from .finetune import TrainConfig, train
from .io import save_checkpoint, save_json, save_scores
from .seg_data import DIGITS_SEG_SIZE, DIGITS_SEG_TRAIN, digits_segmentation
from .segmentation import (DIGITS_SEG_VIT, DIGITS_SEG_VIT_KWARGS, build_segmenter, evaluate_segmenters,
                           format_seg_table, render_predictions)

__all__ = ["SegDemoConfig", "SEG_QUICK", "run_seg_demo", "seg_loss", "compress_segmenter"]


@dataclass
class SegDemoConfig:
    seed: int = 0
    img_size: int = DIGITS_SEG_SIZE
    n_train: int = DIGITS_SEG_TRAIN
    n_val: int = 300
    background_noise: float = 0.0  # > 0: a noisy background (an ablation: no duplicate background tokens)
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    decoder: str = "mask"
    batch_size: int = 32
    dense_epochs: float = 8.0   # 1000 iterations: 56.6 mIoU on seed 0's canvases (4000 × 5 at lr 3e-3: 49.9)
    dense_lr: float = 4e-3
    dense_weight_decay: float = 0.05
    warmup_iters: int = 40
    calib_iters: int = 20
    keep_rates: Tuple[float, ...] = (0.8, 0.7, 0.5)
    prune_rate: float = 0.0
    thresholds: str = "per_layer"
    layers: Optional[Tuple[int, ...]] = None
    ft_epochs: float = 2.0
    ft_lr: float = 5e-4
    alpha: float = 1.0
    tau: float = 20.0
    speed_repeats: int = 5
    n_pictures: int = 5


SEG_QUICK = dict(img_size=32, n_train=64, n_val=16, batch_size=16, dense_epochs=2.0, ft_epochs=1.0, calib_iters=2,
                 keep_rates=(0.7,), speed_repeats=1, n_pictures=2, warmup_iters=2,
                 model_kwargs=dict(embed_dim=32, depth=2, num_heads=1))


def seg_loss(ignore_index: int = IGNORE_INDEX):
    """The per-pixel cross-entropy without unlabelled pixels, as ``train``'s base loss."""
    return lambda logits, targets: pixel_cross_entropy(logits, targets, ignore_index)


def compress_segmenter(dense, scores, keep: float, cfg: SegDemoConfig):
    from ..compress import compress
    pm = copy.deepcopy(dense)
    compress(pm, scores, keep_rate=keep, prune_rate=cfg.prune_rate, thresholds=cfg.thresholds,
             layers=list(cfg.layers) if cfg.layers else None)
    return pm


def _train_config(cfg: SegDemoConfig, dense: bool) -> TrainConfig:
    if dense:
        return TrainConfig(epochs=cfg.dense_epochs, batch_size=cfg.batch_size, lr=cfg.dense_lr,
                           weight_decay=cfg.dense_weight_decay, warmup_iters=cfg.warmup_iters, alpha=0.0,
                           seed=cfg.seed, freeze_structure=True)
    return TrainConfig(epochs=cfg.ft_epochs, batch_size=cfg.batch_size, lr=cfg.ft_lr, alpha=cfg.alpha, tau=cfg.tau,
                       seed=cfg.seed)


def run_seg_demo(out: str, cfg: Optional[SegDemoConfig] = None, device=None, progress: bool = True,
                 log=print) -> Dict[str, object]:
    from ..calibrate import calibrate
    from ..optimize import optimize
    from .segmentation import segmentation_metrics

    cfg = cfg or SegDemoConfig()
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)
    data = digits_segmentation(img_size=cfg.img_size, n_train=cfg.n_train, n_val=cfg.n_val,
                               background_noise=cfg.background_noise)
    kwargs = dict(DIGITS_SEG_VIT_KWARGS, **dict(cfg.model_kwargs, img_size=cfg.img_size))
    log(f"digits segmentation: {len(data.train)} train / {len(data.test)} val canvases, {cfg.img_size}x{cfg.img_size}, "
        f"{data.num_classes} classes; ViT embed {kwargs['embed_dim']}, depth {kwargs['depth']}, heads "
        f"{kwargs['num_heads']}, {cfg.decoder} decoder; torch threads {torch.get_num_threads()}")
    meta = {"task": "segmentation", "model": DIGITS_SEG_VIT, "model_kwargs": kwargs, "decoder": cfg.decoder,
            "num_classes": data.num_classes, "decoder_depth": 2, "data": "digits", "seed": cfg.seed}

    dense = build_segmenter(DIGITS_SEG_VIT, kwargs, data.num_classes, cfg.decoder).to(device)
    t = time.perf_counter()
    hist = train(dense, data, _with_progress(_train_config(cfg, True), progress), device=device, base_loss=seg_loss())
    timings["train_dense_s"] = time.perf_counter() - t
    save_checkpoint(dense, os.path.join(out, "dense.pth"), dict(meta, stage="dense", train=hist))
    log(f"dense segmenter trained: {cfg.dense_epochs:g} epochs in {timings['train_dense_s']:.1f} s")

    t = time.perf_counter()
    calib_loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed + 1)
    scores = calibrate(dense, ((x.to(device), y.to(device)) for x, y in cycle_batches(calib_loader, cfg.calib_iters)))
    timings["calibrate_s"] = time.perf_counter() - t
    save_scores(scores, os.path.join(out, "scores.pt"), dict(meta, iters=cfg.calib_iters))

    val_loader = make_loader(data.test, 64, train=False)
    models, fast, extra = {"dense": dense}, {}, {"dense": {"keep_rate": 1.0}}
    for keep in cfg.keep_rates:
        pm = compress_segmenter(dense, scores, keep, cfg)
        before = segmentation_metrics(pm, val_loader, data.num_classes, device)["miou"]
        t = time.perf_counter()
        hist = train(pm, data, _with_progress(_train_config(cfg, False), progress), teacher=dense, device=device,
                     base_loss=seg_loss())
        timings[f"finetune_keep{keep:g}_s"] = time.perf_counter() - t
        save_checkpoint(pm, os.path.join(out, f"pm_keep{keep:g}.pth"),
                        dict(meta, stage="finetuned", keep_rate=keep, prune_rate=cfg.prune_rate,
                             thresholds=cfg.thresholds, layers=list(cfg.layers) if cfg.layers else None, train=hist))
        name = f"PM keep {keep:g}"
        models[name], fast[name] = pm, optimize(pm.eval())
        extra[name] = {"keep_rate": keep, "miou_before_finetune": before}
        log(f"keep {keep:g}: mIoU {before:.2f} after compress; fine-tuned {cfg.ft_epochs:g} epochs in "
            f"{timings[f'finetune_keep{keep:g}_s']:.1f} s")

    t = time.perf_counter()
    rows = evaluate_segmenters(models, val_loader, (1, cfg.img_size, cfg.img_size), data.num_classes, device,
                               batch_size=cfg.batch_size, repeats=cfg.speed_repeats, fast=fast)
    for r in rows:
        r.update(extra[r["model"]])
    timings["evaluate_s"] = time.perf_counter() - t
    table = format_seg_table(rows)
    log(table)

    from .visualize import render_structure
    images = torch.stack([data.test[i][0] for i in range(cfg.n_pictures)])
    labels = torch.stack([data.test[i][1] for i in range(cfg.n_pictures)])
    plots = [render_predictions({k: fast.get(k, m) for k, m in models.items()}, images.to(device), labels,
                                os.path.join(out, "predictions.png"), data.mean, data.std, data.num_classes,
                                title="digits segmentation, validation canvases: image / ground truth / dense / "
                                      "Prune-and-Merge (pixel accuracy)")]
    for keep in cfg.keep_rates:
        plots.append(render_structure(models[f"PM keep {keep:g}"].backbone.cpu(), images[0],
                                      os.path.join(out, f"structure_keep{keep:g}.png"), data.mean, data.std,
                                      title=f"digits Segmenter, keep {keep:g} per layer: centres (dots), merged "
                                            "(centre colour), pruned (black)"))
    timings["total_s"] = time.perf_counter() - t0
    results = {"task": "segmentation", "config": asdict(cfg), "device": str(device),
               "threads": torch.get_num_threads(), "n_train": len(data.train), "n_val": len(data.test),
               "rows": rows, "table": table, "timings": timings, "files": [os.path.relpath(p, out) for p in plots]}
    save_json(results, os.path.join(out, "results.json"))
    log(f"segmentation demo finished in {timings['total_s']:.1f} s; results in {out}/results.json, pictures "
        f"{', '.join(results['files'])}")
    return results


def _with_progress(cfg: TrainConfig, progress: bool) -> TrainConfig:
    cfg.progress = progress
    return cfg
