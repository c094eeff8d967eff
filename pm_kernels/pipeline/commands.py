"""The ``pm-kernels`` subcommands (argument parsing lives in ``pm_kernels.cli``).

Each command reads and checks its inputs, then claims its output (``outputs.claim_output``: path checks and a
lock held for the run) before the long work, and writes atomically (``io.atomic_write``).
"""
import contextlib
import os
import re
import time
from typing import Dict, Optional

import torch

from .data import DIGITS, DataBundle, cycle_batches, load_data, make_loader
from .io import PipelineError, load_scores, save_checkpoint, save_json, save_scores
from .model import DIGITS_VIT, load_model
from .outputs import claim_output, companion_json

__all__ = ["cmd_train", "cmd_calibrate", "cmd_compress", "cmd_finetune", "cmd_evaluate", "cmd_visualize",
           "cmd_demo"]


def _claim(args, *inputs, lock: bool = True):
    """Check ``--out`` and its results JSON against each other and the inputs, and lock it for this run."""
    return claim_output(args.out, companions=[companion_json(args.out)], inputs=inputs, lock=lock)


def _args_dict(args) -> Dict[str, object]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, flush=True)


def _model_img_size(model) -> int:
    return int(model.patch_embed.img_size[0])


def _data_for(args, model) -> DataBundle:
    data = load_data(args.data, seed=args.seed, img_size=_model_img_size(model))
    if data.num_classes > model.num_classes:
        raise PipelineError(f"data {args.data}: {data.num_classes} classes, but the model's head has "
                            f"{model.num_classes}")
    if data.in_chans != model.patch_embed.proj.in_channels:
        raise PipelineError(f"data {args.data}: {data.in_chans}-channel images, the model takes "
                            f"{model.patch_embed.proj.in_channels}")
    return data


def _load(args, path: Optional[str]):
    """(model, meta) from ``path``, or a fresh ``--model`` fitted to ``--data`` (classes, channels, size)."""
    extra = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    num_classes = None
    if path is None:
        if not getattr(args, "model", None):
            raise PipelineError("checkpoint: give --checkpoint (or --model to start from a fresh model)")
        if args.data == DIGITS and args.model != DIGITS_VIT:
            extra.update(in_chans=1, img_size=args.img_size or 32)
        num_classes = load_data(args.data, seed=args.seed, img_size=extra.get("img_size")).num_classes
    return load_model(path, getattr(args, "model", None), num_classes=num_classes, extra_kwargs=extra)


def _train_config(args, data: DataBundle, distill: bool):
    from .finetune import TrainConfig
    folder = data.allows_mixup
    pick = lambda v, folder_default: v if v is not None else (folder_default if folder else 0.0)
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr, lr=args.lr,
                       min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_iters=args.warmup_iters,
                       alpha=args.alpha if distill else 0.0, tau=args.tau if distill else 20.0,
                       mixup=pick(args.mixup, 0.8), cutmix=pick(args.cutmix, 1.0), smoothing=pick(args.smoothing, 0.1),
                       authors_lr_quirk=getattr(args, "authors_lr_quirk", False), amp=args.amp, seed=args.seed,
                       workers=args.workers, max_iters=args.max_iters, progress=not args.quiet,
                       freeze_structure=not distill)


def _run_training(args, device, distill: bool) -> None:
    from .evaluate import accuracy
    from .finetune import init_distributed

    info = init_distributed(timeout_s=args.dist_timeout)
    if info["distributed"] and device.type == "cuda":
        device = torch.device("cuda", info["local_rank"])
    model, meta = _load(args, args.checkpoint)
    data = _data_for(args, model)
    teacher = None
    if distill:
        if args.teacher:
            teacher, _ = load_model(args.teacher, meta.get("model"))
            if teacher.num_classes != model.num_classes:
                raise PipelineError(f"teacher {args.teacher}: {teacher.num_classes} classes, the student has "
                                    f"{model.num_classes}")
        elif args.alpha != 0:
            raise PipelineError("finetune: give --teacher (the dense checkpoint) or --alpha 0 for no distillation")
    cfg = _train_config(args, data, distill)
    # Only rank 0 writes: it alone holds the output's lock; every rank checks the path before training.
    with _claim(args, args.checkpoint, getattr(args, "teacher", None), lock=info["rank"] == 0):
        t = time.perf_counter()
        hist = _train_ranks(model, data, cfg, teacher, device, info)
        elapsed = time.perf_counter() - t
        if info["rank"] == 0:
            test_loader = make_loader(data.test, args.batch_size, train=False)
            top1 = accuracy(model, test_loader, device, progress=not args.quiet)
            compressed = any(not blk.is_identity for blk in model.blocks)
            stage = "finetuned" if (distill or compressed) else "dense"
            save_checkpoint(model, args.out, dict(meta, stage=stage, data=args.data, train=hist))
            save_json({"command": args.command, "args": _args_dict(args), "top1": top1, "train_s": elapsed,
                       "world_size": info["world_size"], "history": hist}, companion_json(args.out))
            _log(args, f"top-1 {top1:.2f}% on {len(data.test)} test images; wrote {args.out}")
    # Reached only on success. An error path enters no collective (no barrier): the other ranks may be inside
    # one, waiting for this rank, and would never join; exiting is what brings the job down (torchrun stops
    # the other ranks when one fails, and a rank waiting on a dead peer fails at once or at the timeout).
    if info["distributed"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _train_ranks(model, data, cfg, teacher, device, info, **train_kwargs):
    """``finetune.train``, with a failure of the process group (a peer died, a collective timed out) as one line."""
    from .finetune import train
    try:
        return train(model, data, cfg, teacher=teacher, device=device, **train_kwargs)
    except RuntimeError as err:
        # gloo reports a dead peer as a plain RuntimeError ("Connection closed by peer"); DistError covers the rest
        if not info["distributed"] or not (isinstance(err, torch.distributed.DistError)
                                           or _COLLECTIVE_FAILURE.search(str(err))):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PipelineError(f"distributed training (rank {info['rank']} of {info['world_size']}): another rank "
                            f"failed or a collective timed out ({reason})") from None


_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|c10d|connection closed|timed out|timeout", re.IGNORECASE)


def cmd_train(args, device) -> None:
    _run_training(args, device, distill=False)


def cmd_finetune(args, device) -> None:
    _run_training(args, device, distill=True)


@contextlib.contextmanager
def _library_errors(what: str):
    """The library's own input checks (TypeError / ValueError naming the argument) as the CLI's one line."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{what}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None


def cmd_calibrate(args, device) -> None:
    from tqdm import tqdm

    from ..calibrate import calibrate
    model, meta = _load(args, args.checkpoint)
    data = _data_for(args, model)
    with _claim(args, args.checkpoint):
        model.to(device)
        loader = make_loader(data.train, args.batch_size, train=True, seed=args.seed, workers=args.workers)
        batches = tqdm(cycle_batches(loader, args.iters), total=args.iters, desc="calibrate", disable=args.quiet,
                       leave=False)
        t = time.perf_counter()
        with _library_errors("calibrate"):  # among them: calibration runs on the dense model only
            scores = calibrate(model, ((x.to(device), y.to(device)) for x, y in batches))
        info = dict(model=meta["model"], model_kwargs=meta["model_kwargs"], depth=len(model.blocks),
                    num_patches=model.patch_embed.num_patches, iters=args.iters, batch_size=args.batch_size,
                    data=args.data, checkpoint=args.checkpoint)
        save_scores(scores, args.out, info)
        save_json({"command": "calibrate", "args": _args_dict(args), "shape": list(scores.shape),
                   "seconds": time.perf_counter() - t}, companion_json(args.out))
    _log(args, f"scores {tuple(scores.shape)} from {args.iters} batches; wrote {args.out}")


def cmd_compress(args, device) -> None:
    from ..compress import compress
    scores = load_scores(args.scores)["scores"]
    model, meta = _load(args, args.checkpoint)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    if any(not blk.is_identity for blk in model.blocks):  # the library would re-compress, dropping the structure
        raise PipelineError(f"checkpoint {args.checkpoint}: is already compressed; compress the dense model")
    with _claim(args, args.checkpoint, args.scores):
        with _library_errors("compress"):  # rates, their sum, the scores' shape against the model
            compress(model, scores, keep_rate=args.keep_rate, prune_rate=args.prune_rate)
        ks = [blk.num_kept(n) for blk in model.blocks]
        save_checkpoint(model, args.out, dict(meta, stage="compressed", keep_rate=args.keep_rate,
                                              prune_rate=args.prune_rate, scores=args.scores, K=ks))
        pruned = [blk.num_pruned for blk in model.blocks]
        save_json({"command": "compress", "args": _args_dict(args), "K": ks, "N": n, "pruned": pruned,
                   "mean_keep": sum(ks) / (len(ks) * n)}, companion_json(args.out))
    _log(args, f"K per block {ks} of N={n} (mean {sum(ks) / (len(ks) * n):.3f}); pruned {pruned}; wrote {args.out}")


def cmd_evaluate(args, device) -> None:
    from .evaluate import evaluate_models, format_table, plot_accuracy_vs_keep
    paths = ([args.dense] if args.dense else []) + list(args.checkpoint)
    if not paths:
        raise PipelineError("evaluate: give --dense and/or --checkpoint")
    models, extra, data = {}, {}, None
    for i, path in enumerate(paths):
        model, meta = _load(args, path)
        if data is None:
            data = _data_for(args, model)
            shape = (data.in_chans, _model_img_size(model), _model_img_size(model))
        name = "dense" if (args.dense and i == 0) else os.path.splitext(os.path.basename(path))[0]
        while name in models:
            name += "'"
        models[name] = model
        extra[name] = {"checkpoint": path, "keep_rate": 1.0 if name == "dense" else meta.get("keep_rate")}
        if extra[name]["keep_rate"] is None:
            extra[name].pop("keep_rate")
    with claim_output(args.out_dir, is_dir=True, inputs=paths):
        loader = make_loader(data.test, args.batch_size, train=False, workers=args.workers)
        rows = evaluate_models(models, loader, shape, device=device, batch_size=args.batch_size,
                               progress=not args.quiet, repeats=args.repeats)
        for r in rows:
            r.update(extra[r["model"]])
        table = format_table(rows)
        print(table)
        plot = plot_accuracy_vs_keep(rows, os.path.join(args.out_dir, "accuracy_vs_keep.png"))
        save_json({"command": "evaluate", "args": _args_dict(args), "device": str(device),
                   "threads": torch.get_num_threads(), "rows": rows, "table": table, "plot": plot},
                  os.path.join(args.out_dir, "results.json"))
    _log(args, f"wrote {args.out_dir}/results.json and {plot}")


def cmd_visualize(args, device) -> None:
    from .visualize import render_structure
    model, meta = _load(args, args.checkpoint)
    data = _data_for(args, model)
    if not 0 <= args.index < len(data.test):
        raise PipelineError(f"index {args.index}: expected 0 <= index < {len(data.test)} (test images)")
    with _claim(args, args.checkpoint):
        image = data.test[args.index][0]
        render_structure(model.cpu(), image, args.out, data.mean, data.std,
                         title=f"{meta.get('model')} keep {meta.get('keep_rate', 1.0)}: centres (dots), merged "
                               "(centre colour), pruned (black)")
        save_json({"command": "visualize", "args": _args_dict(args)}, companion_json(args.out))
    _log(args, f"wrote {args.out}")


def cmd_demo(args, device) -> None:
    from .demo import QUICK, DemoConfig, run_demo
    cfg = DemoConfig(seed=args.seed, **(QUICK if args.quick else {}))
    if args.keep_rates:
        cfg.keep_rates = tuple(args.keep_rates)
    with claim_output(args.out, is_dir=True):
        run_demo(args.out, cfg, device=device, progress=not args.quiet, log=lambda m: print(m, flush=True))
