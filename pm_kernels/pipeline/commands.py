"""The ``pm-kernels`` subcommands, written once for every task (argument parsing lives in ``pm_kernels.cli``).

``args.task`` names the task (``tasks.TASKS``); what differs between tasks (data, model, loss, metrics, pictures,
compress defaults) is the task's, everything else is here. ``pm_kernels.cli`` claims each command's output
before calling it (``outputs.claim_command_output``: path checks and a lock held for the run, taken before any
input is read); a command writes atomically (``io.atomic_write``); under torchrun only rank 0 writes, and an
error path enters no collective.
"""
import contextlib
import os
import re
import time
import warnings
from typing import Dict, Optional

import torch

from . import host
from .data import cycle_batches, is_unlabelled_folder, make_loader, unlabelled_images
from .io import PipelineError, PipelineWarning, load_scores, remove_record, save_checkpoint, save_json, save_scores
from .outputs import companion_json
from .tasks import get_task
from .tasks.base import HeadFromData

__all__ = ["cmd_train", "cmd_calibrate", "cmd_compress", "cmd_finetune", "cmd_evaluate", "cmd_visualize",
           "cmd_demo", "load_for", "model_and_data"]


def _args_dict(args) -> Dict[str, object]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, flush=True)


def load_for(args, path: Optional[str], num_classes: Optional[int] = None, extra: Optional[dict] = None):
    """(model, meta) of the run's task from ``path`` (``--img-size`` must agree with it), or fresh."""
    task = get_task(args.task)
    extra = dict(extra or {})
    if getattr(args, "img_size", None):
        extra.setdefault("img_size", args.img_size)
    return task.load(path, getattr(args, "model", None), num_classes=num_classes, extra_kwargs=extra,
                     options=task.model_options(args))


def model_and_data(args, path: Optional[str]):
    """(model, meta, data): the checkpoint's model and ``--data`` at its image size, checked to fit it; or, without
    a checkpoint, a fresh ``--model`` (the task's default on its embedded data) sized for the data."""
    task = get_task(args.task)
    if path is not None:
        try:
            model, meta = load_for(args, path)
        except HeadFromData:
            if args.command not in ("train", "finetune"):
                raise
            # another task's checkpoint gives the backbone; the new head takes the data's classes (the data's
            # size is the backbone's: a first build, with one class, tells it)
            data = task.load_data(args.data, seed=args.seed, img_size=host.img_size(load_for(args, path, 1)[0]))
            model, meta = load_for(args, path, num_classes=data.num_classes)
        else:
            data = task.load_data(args.data, seed=args.seed, img_size=host.img_size(model))
        task.check_data(model, data, args.data)
        return model, meta, data
    if not (getattr(args, "model", None) or task.default_model(args.data)):
        raise PipelineError("checkpoint: give --checkpoint (or --model to start from a fresh model)")
    data = task.load_data(args.data, seed=args.seed, img_size=getattr(args, "img_size", None))
    extra = {"in_chans": data.in_chans}
    if data.sets_model_size:
        extra["img_size"] = data.img_size
    if not getattr(args, "model", None):
        args.model = task.default_model(args.data)
    model, meta = load_for(args, None, num_classes=data.num_classes, extra=extra)
    _check_img_size(args, model)
    if host.img_size(model) != data.img_size:  # a folder of images takes the model's size
        data = task.load_data(args.data, seed=args.seed, img_size=host.img_size(model))
    return model, meta, data


def _check_img_size(args, model) -> None:
    """A fresh model built for ``--img-size``: a whole number of patches (else timm fails at the first forward)."""
    size, patch = getattr(args, "img_size", None), host.patch_size(model)
    if size and size % patch:
        raise PipelineError(f"img size {size}: not a multiple of the model's patch size {patch} (e.g. "
                            f"{max(patch, size - size % patch)})")


def _check_batch_fits(args, model, device) -> None:
    """A training batch at the model's size fits in memory (a lower bound of its activations)."""
    from .resources import check_fits, training_bytes
    need = training_bytes(args.batch_size, host.num_tokens(model), host.embed_dim(model), len(host.layers(model)))
    check_fits(f"training at img size {host.img_size(model)} ({host.num_tokens(model)} tokens), batch "
               f"{args.batch_size},", need, device)


def _train_config(args, task, data, distill: bool):
    from .finetune import TrainConfig
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr, lr=args.lr,
                       min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_iters=args.warmup_iters,
                       alpha=args.alpha if distill else 0.0, tau=args.tau if distill else 20.0,
                       authors_lr_quirk=getattr(args, "authors_lr_quirk", False), amp=args.amp, seed=args.seed,
                       workers=args.workers, max_iters=args.max_iters, progress=not args.quiet,
                       freeze_structure=not distill, **task.train_options(args, data))


def _run_training(args, device, distill: bool) -> None:
    from .finetune import init_distributed

    task = get_task(args.task)
    info = init_distributed(timeout_s=args.dist_timeout)
    if info["distributed"] and device.type == "cuda":
        device = torch.device("cuda", info["local_rank"])
    model, meta, data = model_and_data(args, args.checkpoint)
    _check_batch_fits(args, model, device)
    teacher = None
    if distill:
        if args.teacher:
            teacher, _ = task.load(args.teacher, meta.get("model"), options=task.model_options(args))
            _refuse_compressed(teacher, args.teacher, "distil from")
            if task.num_classes(teacher) != task.num_classes(model):
                raise PipelineError(f"teacher {args.teacher}: {task.num_classes(teacher)} classes, the student has "
                                    f"{task.num_classes(model)}")
        elif args.alpha != 0:
            raise PipelineError("finetune: give --teacher (the dense checkpoint) or --alpha 0 for no distillation")
    cfg = _train_config(args, task, data, distill)
    # Only rank 0 writes: it alone holds the output's lock (pm_kernels.cli); every rank checked the path.
    t = time.perf_counter()
    hist = _train_ranks(model, data, cfg, teacher, device, info, base_loss=task.loss(model))
    elapsed = time.perf_counter() - t
    if info["rank"] == 0:
        metrics = task.metrics(model, task.eval_loader(data, args.batch_size), device, progress=not args.quiet)
        stage = "finetuned" if (distill or host.is_compressed(model)) else "dense"
        remove_record(companion_json(args.out))
        save_checkpoint(model, args.out, dict(meta, stage=stage, data=args.data, train=hist))
        save_json({"command": args.command, "task": task.name, "args": _args_dict(args), **metrics,
                   "train_s": elapsed, "world_size": info["world_size"], "history": hist},
                  companion_json(args.out))
        _log(args, f"{task.summary(metrics, len(data.test))}; wrote {args.out}")
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
def library_errors(what: str):
    """The library's own input checks (TypeError / ValueError naming the argument) as the CLI's one line."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{what}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None


def _refuse_compressed(model, path: str, what: str) -> None:
    # calibration needs the dense model; compress would drop the structure; a teacher is the dense model
    if host.is_compressed(model):
        raise PipelineError(f"checkpoint {path}: is already compressed; {what} the dense model")


def cmd_calibrate(args, device) -> None:
    from tqdm import tqdm

    from ..calibrate import calibrate
    task = get_task(args.task)
    unlabelled = is_unlabelled_folder(args.data)
    if unlabelled:  # images without classes: a given model, scored by a label-free objective
        if args.checkpoint is None:
            raise PipelineError("checkpoint: a folder of images without class sub-folders calibrates a trained "
                                "model: give --checkpoint")
        model, meta = load_for(args, args.checkpoint)
        channels, size, _ = host.input_shape(model)
        train = unlabelled_images(args.data, img_size=size, in_chans=channels)
    else:
        model, meta, data = model_and_data(args, args.checkpoint)
        train = data.train
    _refuse_compressed(model, args.checkpoint, "calibrate")
    _check_batch_fits(args, model, device)  # calibration differentiates through the model as training does
    model.to(device)
    loader = make_loader(train, args.batch_size, train=True, seed=args.seed, workers=args.workers)
    batches = tqdm(cycle_batches(loader, args.iters), total=args.iters, desc="calibrate", disable=args.quiet,
                   leave=False)
    objective = args.objective
    labelled = not unlabelled and objective in (None, "labels")
    t = time.perf_counter()
    with library_errors("calibrate"):
        scores = calibrate(model, ((x.to(device), y.to(device)) if labelled else x.to(device) for x, y in batches),
                           objective=objective)
    if not bool(torch.isfinite(scores).all()):  # NaN in the images or the loss: no ranking can come of it
        raise PipelineError("calibrate: the scores are not finite (NaN or inf in the images, or an empty batch); "
                            "nothing written")
    info = dict(task=task.name, model=meta["model"], model_kwargs=meta["model_kwargs"],
                depth=len(host.layers(model)), num_patches=host.num_patches(model), iters=args.iters,
                batch_size=args.batch_size, data=args.data, checkpoint=args.checkpoint,
                objective=objective or ("labels" if labelled else "default without labels"))
    remove_record(companion_json(args.out))
    save_scores(scores, args.out, info)
    save_json({"command": "calibrate", "task": task.name, "args": _args_dict(args), "shape": list(scores.shape),
               "seconds": time.perf_counter() - t}, companion_json(args.out))
    _log(args, f"scores {tuple(scores.shape)} from {args.iters} batches; wrote {args.out}")


def cmd_compress(args, device) -> None:
    from ..compress import compress
    from ..structure import default_prune_rate
    task = get_task(args.task)
    options = task.compress_options(args)
    prune = args.prune_rate if args.prune_rate is not None else default_prune_rate(options["thresholds"])
    loaded = load_scores(args.scores)
    scores = loaded["scores"]
    written_for = loaded["meta"].get("task")
    if written_for is not None and written_for != task.name:  # the same shape says nothing: a backbone's grid
        raise PipelineError(f"scores {args.scores}: calibrated on a {written_for} model, this run is --task "
                            f"{task.name}")
    _check_scores(scores, args.scores)
    model, meta = load_for(args, args.checkpoint)
    _refuse_compressed(model, args.checkpoint, "compress")
    with library_errors("compress"):  # rates, their sum, the scores' shape against the model, the layers
        compress(model, scores, keep_rate=args.keep_rate, prune_rate=prune, **options)
    n, ks, pruned = host.num_tokens(model), host.kept_tokens(model), host.pruned_tokens(model)
    remove_record(companion_json(args.out))
    save_checkpoint(model, args.out, dict(meta, stage="compressed", keep_rate=args.keep_rate, prune_rate=prune,
                                          scores=args.scores, K=ks, **options))
    save_json({"command": "compress", "task": task.name, "args": _args_dict(args), "K": ks, "N": n,
               "pruned": pruned, "prune_rate": prune, **options, "mean_keep": sum(ks) / (len(ks) * n)},
              companion_json(args.out))
    _log(args, f"K per block {ks} of N={n} (mean {sum(ks) / (len(ks) * n):.3f}, {options['thresholds']} thresholds); "
               f"pruned {pruned}; wrote {args.out}")


def _check_scores(scores: torch.Tensor, path: str) -> None:
    """All-zero scores (calibrating on one-class data: no gradient) rank nothing, and compress would keep the
    identity; a block whose scores are all equal gets an arbitrary structure (K = 2)."""
    if not bool(scores.ne(0).any()):
        raise PipelineError(f"scores {path}: all zero (calibration on data of one class gives no gradient): nothing "
                            "to rank the tokens by")
    tied = [i for i, row in enumerate(scores) if bool((row == row[0]).all())]
    if tied:
        warnings.warn(PipelineWarning(f"scores {path}: block(s) {', '.join(map(str, tied))} have all their scores "
                                      "equal: their structure is arbitrary"))


def cmd_evaluate(args, device) -> None:
    from .evaluate import evaluate_models, format_table, plot_accuracy_vs_keep
    task = get_task(args.task)
    paths = ([args.dense] if args.dense else []) + list(args.checkpoint)
    if not paths:
        raise PipelineError("evaluate: give --dense and/or --checkpoint")
    metric_options = task.evaluate_options(args)
    models, extra, data = {}, {}, None
    for i, path in enumerate(paths):
        if data is None:
            model, meta, data = model_and_data(args, path)
        else:
            model, meta = load_for(args, path)
            task.check_data(model, data, args.data)
        name = "dense" if (args.dense and i == 0) else os.path.splitext(os.path.basename(path))[0]
        while name in models:
            name += "'"
        models[name] = model
        keep = 1.0 if name == "dense" else meta.get("keep_rate")
        extra[name] = {"checkpoint": path, **({"keep_rate": keep} if keep is not None else {})}
    rows = evaluate_models(task, models, data, device=device, batch_size=args.batch_size, repeats=args.repeats,
                           workers=args.workers, progress=not args.quiet,
                           metric_options=metric_options)
    for r in rows:
        r.update(extra[r["model"]])
    table = format_table(task, rows)
    print(table)
    remove_record(os.path.join(args.out_dir, "results.json"))
    plot = plot_accuracy_vs_keep(task, rows, os.path.join(args.out_dir, "accuracy_vs_keep.png"))
    save_json({"command": "evaluate", "task": task.name, "args": _args_dict(args), "device": str(device),
               "threads": torch.get_num_threads(), "rows": rows, "table": table, "plot": plot},
              os.path.join(args.out_dir, "results.json"))
    _log(args, f"wrote {args.out_dir}/results.json and {plot}")


def cmd_visualize(args, device) -> None:
    from .visualize import render_structure
    task = get_task(args.task)
    model, meta, data = model_and_data(args, args.checkpoint)
    if not 0 <= args.index < len(data.test):
        raise PipelineError(f"index {args.index}: expected 0 <= index < {len(data.test)} (test images)")
    model = model.cpu().eval()
    image, target = data.test[args.index]
    size = host.img_size(model)
    remove_record(companion_json(args.out))
    files = [render_structure(model, image[..., :size, :size], args.out, data.mean, data.std,
                              title=f"{meta.get('model')} keep {meta.get('keep_rate', 1.0)}: centres (dots), "
                                    "merged (centre colour), pruned (black)")]
    files += task.visualize_extra(model, image, target, args.out, data)
    save_json({"command": "visualize", "task": task.name, "args": _args_dict(args), "files": files},
              companion_json(args.out))
    _log(args, f"wrote {', '.join(files)}")


def cmd_demo(args, device) -> None:
    from .demo import run_demo
    task = get_task(args.task)
    cfg = task.demo_config(quick=args.quick, seed=args.seed)
    if args.keep_rates:
        cfg.keep_rates = tuple(args.keep_rates)
    run_demo(task, os.path.abspath(args.out or task.demo_folder), cfg, device=device, progress=not args.quiet,
             log=lambda m: print(m, flush=True))
