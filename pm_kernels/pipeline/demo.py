"""The embedded end-to-end demo of a task, on data that ships with scikit-learn (no download), minutes on a CPU.

1. the task's demo model trained from scratch on the training split;
2. calibrated (SPEC §3) on training batches; 3. compressed at each keep rate (the task's structure search);
4. fine-tuned with distillation from the dense model (SPEC §5; demo budget: short schedule, larger lr);
5. evaluated on the held-out split (``evaluate.evaluate_models``): the task's metrics, MACs and images/s of the
   dense model against each PM model in its deployed form (``optimize``), timed in interleaved rounds;
6. table printed, ``results.json`` (rows, table, Markdown table, environment), ``accuracy_vs_keep.png``,
   ``structure_keep*.png`` and the task's own pictures written to ``out``.
"""
import copy
import os
import time
from dataclasses import asdict
from typing import Dict, Optional

import torch

from ..measure.timing import environment, finish_environment
from . import host
from .data import cycle_batches, make_loader
from .evaluate import evaluate_models, format_table, markdown_table, plot_accuracy_vs_keep
from .finetune import TrainConfig, train
from .io import save_checkpoint, save_json, save_scores
from .tasks.base import DemoConfig

__all__ = ["run_demo", "DemoConfig"]


def _train_configs(cfg: DemoConfig, progress: bool):
    dense = TrainConfig(epochs=cfg.dense_epochs, batch_size=cfg.batch_size, lr=cfg.dense_lr,
                        weight_decay=cfg.dense_weight_decay, warmup_iters=cfg.warmup_iters, alpha=0.0, seed=cfg.seed,
                        progress=progress, freeze_structure=True)
    finetune = TrainConfig(epochs=cfg.ft_epochs, batch_size=cfg.batch_size, lr=cfg.ft_lr, alpha=cfg.alpha,
                           tau=cfg.tau, seed=cfg.seed, progress=progress)
    return dense, finetune


def run_demo(task, out: str, cfg: Optional[DemoConfig] = None, device=None, progress: bool = True,
             log=print) -> Dict[str, object]:
    """Run ``task``'s demo into the folder ``out``; returns what ``results.json`` holds."""
    from ..calibrate import calibrate
    from ..compress import compress
    from ..structure import default_prune_rate

    cfg = cfg or task.demo_config()
    device = torch.device(device or "cpu")
    env = environment(device)
    t0 = time.perf_counter()
    timings = {}
    torch.manual_seed(cfg.seed)
    data = task.demo_data(cfg)
    dense, meta = task.load(None, cfg.model, num_classes=data.num_classes, options=cfg.model_options,
                            extra_kwargs=dict(cfg.model_kwargs, img_size=data.img_size, in_chans=data.in_chans))
    kwargs = meta["model_kwargs"]
    log(f"{task.name} demo: {len(data.train)} train / {len(data.test)} test images, {data.img_size}x{data.img_size}, "
        f"{data.num_classes} classes; {cfg.model}: embed {kwargs['embed_dim']}, depth {kwargs['depth']}, heads "
        f"{kwargs['num_heads']}; torch threads {torch.get_num_threads()}")
    meta = dict(meta, data="digits", seed=cfg.seed)
    dense_cfg, ft_cfg = _train_configs(cfg, progress)
    loss = task.loss(dense)

    dense.to(device)
    t = time.perf_counter()
    hist = train(dense, data, dense_cfg, device=device, base_loss=loss)
    timings["train_dense_s"] = time.perf_counter() - t
    save_checkpoint(dense, os.path.join(out, "dense.pth"), dict(meta, stage="dense", train=hist))
    log(f"dense model trained: {cfg.dense_epochs:g} epochs in {timings['train_dense_s']:.1f} s")

    t = time.perf_counter()
    calib_loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed + 1)
    scores = calibrate(dense, ((x.to(device), y.to(device)) for x, y in cycle_batches(calib_loader, cfg.calib_iters)))
    timings["calibrate_s"] = time.perf_counter() - t
    save_scores(scores, os.path.join(out, "scores.pt"), dict(meta, iters=cfg.calib_iters))

    prune = cfg.prune_rate if cfg.prune_rate is not None else default_prune_rate(cfg.thresholds)
    structure = dict(prune_rate=prune, thresholds=cfg.thresholds,
                     layers=list(cfg.layers) if cfg.layers else None)
    models, extra = {"dense": dense}, {"dense": {"keep_rate": 1.0}}
    test_loader = task.eval_loader(data, 256)
    for keep in cfg.keep_rates:
        pm = compress(copy.deepcopy(dense), scores, keep_rate=keep, **structure)
        before = task.metrics(pm, test_loader, device)[task.headline]
        pm_meta = dict(meta, keep_rate=keep, **structure, K=host.kept_tokens(pm))
        save_checkpoint(pm, os.path.join(out, f"pm_keep{keep:g}_init.pth"), dict(pm_meta, stage="compressed"))
        t = time.perf_counter()
        hist = train(pm, data, ft_cfg, teacher=dense, device=device, base_loss=loss)
        timings[f"finetune_keep{keep:g}_s"] = time.perf_counter() - t
        save_checkpoint(pm, os.path.join(out, f"pm_keep{keep:g}.pth"), dict(pm_meta, stage="finetuned", train=hist))
        name = f"PM keep {keep:g}"
        models[name] = pm
        extra[name] = {"keep_rate": keep, f"{task.headline}_before_finetune": before}
        log(f"keep {keep:g}: {task.headline_label} {before:.2f} after compress; fine-tuned {cfg.ft_epochs:g} epochs "
            f"in {timings[f'finetune_keep{keep:g}_s']:.1f} s")

    t = time.perf_counter()
    rows = evaluate_models(task, models, data, device=device, batch_size=cfg.batch_size, repeats=cfg.speed_repeats,
                           min_time=cfg.speed_min_time, eval_batch_size=256)
    for r in rows:
        r.update(extra[r["model"]])
    timings["evaluate_s"] = time.perf_counter() - t
    table = format_table(task, rows)
    log(table)

    from .evaluate import deployable
    from .visualize import render_structure
    image = data.test[0][0]
    plots = [plot_accuracy_vs_keep(task, rows, os.path.join(out, "accuracy_vs_keep.png"),
                                   title=f"{cfg.model}: Prune-and-Merge {task.headline_label} vs keep rate")]
    for keep in cfg.keep_rates:
        plots.append(render_structure(models[f"PM keep {keep:g}"].cpu(), image,
                                      os.path.join(out, f"structure_keep{keep:g}.png"), data.mean, data.std,
                                      title=f"{cfg.model}, keep {keep:g}: centres (dots), merged (centre colour), "
                                            "pruned (black)"))
    plots += task.pictures({k: deployable(m.cpu()) for k, m in models.items()}, data, out, cfg.n_pictures)
    timings["total_s"] = time.perf_counter() - t0
    results = {"task": task.name, "config": asdict(cfg), "environment": finish_environment(env),
               "n_train": len(data.train), "n_test": len(data.test), "rows": rows, "table": table,
               "markdown": markdown_table(task, rows), "timings": timings,
               "files": [os.path.relpath(p, out) for p in plots]}
    save_json(results, os.path.join(out, "results.json"))
    log(f"demo finished in {timings['total_s']:.1f} s; results in {out}/results.json, pictures "
        f"{', '.join(results['files'])}")
    return results
