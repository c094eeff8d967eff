"""The ``pm-kernels`` subcommands with ``--task segmentation`` (Segmenter models; argument parsing in ``cli``).

Same files and conventions as the classification commands: checkpoints with ``pm_meta`` (here also ``task``,
``decoder``, ``num_classes``), a results JSON next to every output, one ``error:`` line for bad input.
``--data digits`` is the embedded digits-segmentation task, another value an ADE20K-layout folder.
"""
import os
import time
from typing import Optional

import torch

from .commands import _args_dict, _claim, _log, _train_ranks
from .data import cycle_batches, make_loader
from .io import PipelineError, load_scores, save_checkpoint, save_json, save_scores
from .outputs import claim_output, companion_json
from .seg_data import load_seg_data
from .segmentation import DIGITS_SEG_VIT, load_segmenter

__all__ = ["cmd_train", "cmd_calibrate", "cmd_compress", "cmd_finetune", "cmd_evaluate", "cmd_visualize",
           "cmd_demo"]


def _data(args, img_size: Optional[int] = None):
    return load_seg_data(args.data, img_size=img_size or getattr(args, "img_size", None))


def _load(args, path: Optional[str], data=None):
    """(segmenter, meta): from ``path``, or a fresh ``--model`` (default ``digits_seg_vit`` on ``--data digits``)
    sized for ``data`` (its classes, channels and image size)."""
    extra = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    name = getattr(args, "model", None)
    if path is None:
        if data is None:
            raise PipelineError("checkpoint: give --checkpoint (or --model to start from a fresh model)")
        if not name and data.name != "digits":
            raise PipelineError("checkpoint: give --checkpoint (or --model to start from a fresh model)")
        name = name or DIGITS_SEG_VIT
        extra.update(img_size=data.img_size, in_chans=data.in_chans)
    return load_segmenter(path, name, num_classes=data.num_classes if data is not None else None,
                          decoder=getattr(args, "decoder", None), extra_kwargs=extra)


def _img_size(seg) -> int:
    return int(seg.backbone.patch_embed.img_size[0])


def _train_config(args, distill: bool):
    from .finetune import TrainConfig
    # Image-level mixup / cutmix / label smoothing do not apply to pixel labels: the options are refused.
    for opt in ("mixup", "cutmix", "smoothing"):
        if getattr(args, opt, None):
            raise PipelineError(f"--{opt}: not used for segmentation (pixel labels)")
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr, lr=args.lr,
                       min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_iters=args.warmup_iters,
                       alpha=args.alpha if distill else 0.0, tau=args.tau if distill else 20.0,
                       authors_lr_quirk=getattr(args, "authors_lr_quirk", False), amp=args.amp, seed=args.seed,
                       workers=args.workers, max_iters=args.max_iters, progress=not args.quiet,
                       freeze_structure=not distill)


def _checked_data(args, seg):
    data = _data(args, _img_size(seg))
    if seg.num_classes != data.num_classes:
        raise PipelineError(f"data {args.data}: {data.num_classes} classes, the model's decoder has {seg.num_classes}")
    if data.in_chans != seg.backbone.patch_embed.proj.in_channels:
        raise PipelineError(f"data {args.data}: {data.in_chans}-channel images, the model takes "
                            f"{seg.backbone.patch_embed.proj.in_channels}")
    return data


def _run_training(args, device, distill: bool) -> None:
    from .finetune import init_distributed
    from .seg_demo import seg_loss
    from .segmentation import segmentation_metrics

    info = init_distributed(timeout_s=args.dist_timeout)
    if info["distributed"] and device.type == "cuda":
        device = torch.device("cuda", info["local_rank"])
    if args.checkpoint:
        seg, meta = _load(args, args.checkpoint)
        data = _checked_data(args, seg)
    else:
        data = _data(args)
        seg, meta = _load(args, None, data)
    teacher = None
    if distill:
        if args.teacher:
            teacher, _ = load_segmenter(args.teacher, meta.get("model"), num_classes=seg.num_classes)
        elif args.alpha != 0:
            raise PipelineError("finetune: give --teacher (the dense checkpoint) or --alpha 0 for no distillation")
    cfg = _train_config(args, distill)
    # As the classification commands: only rank 0 writes and holds the lock; no collective on an error path.
    with _claim(args, args.checkpoint, getattr(args, "teacher", None), lock=info["rank"] == 0):
        t = time.perf_counter()
        hist = _train_ranks(seg, data, cfg, teacher, device, info, base_loss=seg_loss(seg.ignore_index))
        elapsed = time.perf_counter() - t
        if info["rank"] == 0:
            loader = make_loader(data.test, args.batch_size if data.name == "digits" else 1, train=False)
            metrics = segmentation_metrics(seg, loader, seg.num_classes, device, window=(_img_size(seg),) * 2,
                                           progress=not args.quiet)
            compressed = any(not b.is_identity for b in seg.backbone.blocks)
            stage = "finetuned" if (distill or compressed) else "dense"
            save_checkpoint(seg, args.out, dict(meta, stage=stage, data=args.data, train=hist))
            save_json({"command": args.command, "task": "segmentation", "args": _args_dict(args),
                       "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"], "train_s": elapsed,
                       "world_size": info["world_size"], "history": hist}, companion_json(args.out))
            _log(args, f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}% on "
                       f"{len(data.test)} validation images; wrote {args.out}")
    if info["distributed"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cmd_train(args, device) -> None:
    _run_training(args, device, distill=False)


def cmd_finetune(args, device) -> None:
    _run_training(args, device, distill=True)


def cmd_calibrate(args, device) -> None:
    from tqdm import tqdm

    from ..calibrate import calibrate
    seg, meta = _load(args, args.checkpoint)
    if any(not b.is_identity for b in seg.backbone.blocks):
        raise PipelineError(f"checkpoint {args.checkpoint}: is compressed; calibrate the dense model")
    data = _checked_data(args, seg)
    seg.to(device)
    loader = make_loader(data.train, args.batch_size, train=True, seed=args.seed, workers=args.workers)
    batches = tqdm(cycle_batches(loader, args.iters), total=args.iters, desc="calibrate", disable=args.quiet,
                   leave=False)
    t = time.perf_counter()
    try:
        scores = calibrate(seg, ((x.to(device), y.to(device)) for x, y in batches))
    except (TypeError, ValueError) as err:
        raise PipelineError(f"calibrate: {str(err).splitlines()[0]}") from None
    info = dict(task="segmentation", model=meta["model"], model_kwargs=meta["model_kwargs"],
                depth=len(seg.backbone.blocks), num_patches=seg.backbone.patch_embed.num_patches, iters=args.iters,
                batch_size=args.batch_size, data=args.data, checkpoint=args.checkpoint)
    with _claim(args, args.checkpoint):
        save_scores(scores, args.out, info)
        save_json({"command": "calibrate", "task": "segmentation", "args": _args_dict(args),
                   "shape": list(scores.shape), "seconds": time.perf_counter() - t}, companion_json(args.out))
    _log(args, f"scores {tuple(scores.shape)} from {args.iters} batches (per-pixel cross-entropy); wrote {args.out}")


def cmd_compress(args, device) -> None:
    from ..compress import compress
    from ..structure import default_prune_rate
    thresholds = args.thresholds or "per_layer"
    prune = args.prune_rate if args.prune_rate is not None else default_prune_rate(thresholds)
    if args.keep_rate + prune > 1.0 + 1e-9:
        raise PipelineError(f"keep rate + prune rate must be <= 1, got {args.keep_rate} + {prune}")
    scores = load_scores(args.scores)["scores"]
    seg, meta = _load(args, args.checkpoint)
    bb = seg.backbone
    expected = (len(bb.blocks), bb.patch_embed.num_patches)
    if tuple(scores.shape) != expected:
        raise PipelineError(f"scores {args.scores}: shape {tuple(scores.shape)} is for a model with {scores.shape[0]} "
                            f"blocks and {scores.shape[1]} patches; this backbone has {expected[0]} blocks and "
                            f"{expected[1]} patches")
    if any(not b.is_identity for b in bb.blocks):
        raise PipelineError(f"checkpoint {args.checkpoint}: is already compressed; compress the dense model")
    try:
        compress(seg, scores, keep_rate=args.keep_rate, prune_rate=prune, thresholds=thresholds, layers=args.layers)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"compress: {str(err).splitlines()[0]}") from None
    n = expected[1] + bb.num_prefix_tokens
    ks = [b.num_kept(n) for b in bb.blocks]
    with _claim(args, args.checkpoint, args.scores):
        save_checkpoint(seg, args.out, dict(meta, stage="compressed", keep_rate=args.keep_rate, prune_rate=prune,
                                            thresholds=thresholds, layers=args.layers, scores=args.scores, K=ks))
        save_json({"command": "compress", "task": "segmentation", "args": _args_dict(args), "K": ks, "N": n,
                   "thresholds": thresholds, "prune_rate": prune, "mean_keep": sum(ks) / (len(ks) * n)},
                  companion_json(args.out))
    _log(args, f"K per block {ks} of N={n} ({thresholds} thresholds, prune rate {prune}); wrote {args.out}")


def cmd_evaluate(args, device) -> None:
    from ..optimize import optimize
    from .segmentation import evaluate_segmenters, format_seg_table
    paths = ([args.dense] if args.dense else []) + list(args.checkpoint)
    if not paths:
        raise PipelineError("evaluate: give --dense and/or --checkpoint")
    models, fast, extra, data = {}, {}, {}, None
    for i, path in enumerate(paths):
        seg, meta = _load(args, path)
        if data is None:
            data = _checked_data(args, seg)
        elif seg.num_classes != data.num_classes:
            raise PipelineError(f"checkpoint {path}: {seg.num_classes} classes, the data has {data.num_classes}")
        name = "dense" if (args.dense and i == 0) else os.path.splitext(os.path.basename(path))[0]
        while name in models:
            name += "'"
        models[name] = seg
        if any(not b.is_identity for b in seg.backbone.blocks):
            fast[name] = optimize(seg.to(device).eval())
        extra[name] = {"checkpoint": path, "keep_rate": 1.0 if name == "dense" else meta.get("keep_rate")}
    size = _img_size(next(iter(models.values())))
    window = (args.window or size,) * 2
    loader = make_loader(data.test, args.batch_size if data.name == "digits" else 1, train=False,
                         workers=args.workers)
    rows = evaluate_segmenters(models, loader, (data.in_chans, window[0], window[1]), data.num_classes, device,
                               batch_size=args.batch_size, repeats=args.repeats, window=window,
                               progress=not args.quiet, fast=fast)
    for r in rows:
        r.update({k: v for k, v in extra[r["model"]].items() if v is not None})
    table = format_seg_table(rows)
    print(table)
    with claim_output(args.out_dir, is_dir=True, inputs=paths):
        save_json({"command": "evaluate", "task": "segmentation", "args": _args_dict(args), "device": str(device),
                   "threads": torch.get_num_threads(), "rows": rows, "table": table},
                  os.path.join(args.out_dir, "results.json"))
    _log(args, f"wrote {args.out_dir}/results.json")


def cmd_visualize(args, device) -> None:
    from .segmentation import render_predictions
    from .visualize import render_structure
    seg, meta = _load(args, args.checkpoint)
    data = _checked_data(args, seg)
    if not 0 <= args.index < len(data.test):
        raise PipelineError(f"index {args.index}: expected 0 <= index < {len(data.test)} (validation images)")
    image, labels = data.test[args.index]
    seg = seg.cpu().eval()
    size = _img_size(seg)
    shown = image if image.shape[-1] == size else image[..., :size, :size]
    pred_path = os.path.splitext(args.out)[0] + "_prediction.png"
    with _claim(args, args.checkpoint):
        render_structure(seg.backbone, shown, args.out, data.mean, data.std,
                         title=f"{meta.get('model')} keep {meta.get('keep_rate', 1.0)}: centres (dots), merged "
                               "(centre colour), pruned (black)")
        render_predictions({"model": seg}, image[None], labels[None], pred_path, data.mean, data.std,
                           seg.num_classes, window=(size, size))
        save_json({"command": "visualize", "task": "segmentation", "args": _args_dict(args),
                   "files": [args.out, pred_path]}, companion_json(args.out))
    _log(args, f"wrote {args.out} and {pred_path}")


def cmd_demo(args, device) -> None:
    from .seg_demo import SEG_QUICK, SegDemoConfig, run_seg_demo
    cfg = SegDemoConfig(seed=args.seed, **(SEG_QUICK if args.quick else {}))
    if args.keep_rates:
        cfg.keep_rates = tuple(args.keep_rates)
    out = os.path.join("runs", "seg_demo") if os.path.normpath(args.out) == os.path.join("runs", "demo") else args.out
    run_seg_demo(out, cfg, device=device, progress=not args.quiet, log=lambda m: print(m, flush=True))
