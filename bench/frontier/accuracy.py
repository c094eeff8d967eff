"""Accuracy phase of the digits frontier: per seed, dense ViT → calibration → PM at each keep rate, ToMe and
EViT matched to each PM model's GMACs, all fine-tuned with the same recipe from the same teacher.

Per seed the dense model and the calibration scores are cached in a work folder (``--work``), so a variant or
a resumed run reuses the same teacher and scores (paired by seed). Every finished model is written to its
seed's JSON at once (``seed<s>.json``, or ``variants/<name>/seed<s>.json``): an interrupted run resumes where
it stopped. A row stores what the timing phase needs to rebuild the model without weights (PM: the scores
and pruned / centre masks; ToMe: r per block; EViT: keep rate and blocks), because images/s depend on the
structure only.
"""
import copy
import datetime as _dt
import json
import os
import time
from typing import Dict, List, Optional

import torch

from bench.common import plain_vit
from bench.peers import default_locations, dense_flops, dims_from_model, match_evit_keep_rate, match_tome_r, \
    patch_evit, patch_tome
from pm_kernels import calibrate, install_structure, optimize, patch_timm
from pm_kernels.measure import analytic_macs, kept_tokens, traced_macs
from pm_kernels.pipeline.data import cycle_batches, load_data, make_loader
from pm_kernels.pipeline.families import DIGITS_VIT, DIGITS_VIT_KWARGS
from pm_kernels.pipeline.finetune import TrainConfig, train
from pm_kernels.pipeline.io import save_checkpoint
from pm_kernels.pipeline.model import build_model, load_model
from pm_kernels.pipeline.tasks import TASKS
from pm_kernels.pipeline.tasks.classification import accuracy

from .variants import BASELINE, PMVariant, prune_rate_for, train_config, variant_structure

__all__ = ["KEEP_RATES", "INPUT", "dense_and_scores", "run_seed", "seed_path", "recipe"]

KEEP_RATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
INPUT = (DIGITS_VIT_KWARGS["in_chans"], DIGITS_VIT_KWARGS["img_size"], DIGITS_VIT_KWARGS["img_size"])


def recipe(seed: int) -> Dict[str, object]:
    """The digits demo's recipe (the classification demo's defaults): dense training and the fine-tuning of every
    method."""
    cfg = TASKS["classification"].demo_config(seed=seed)
    dense = TrainConfig(epochs=cfg.dense_epochs, batch_size=cfg.batch_size, lr=cfg.dense_lr,
                        weight_decay=cfg.dense_weight_decay, warmup_iters=cfg.warmup_iters, alpha=0.0, seed=seed,
                        progress=False, freeze_structure=True)
    ft = TrainConfig(epochs=cfg.ft_epochs, batch_size=cfg.batch_size, lr=cfg.ft_lr, alpha=cfg.alpha, tau=cfg.tau,
                     seed=seed, progress=False)
    return {"demo": cfg, "dense": dense, "finetune": ft}


def seed_path(results_dir: str, seed: int, variant: PMVariant = BASELINE) -> str:
    if variant.name == BASELINE.name:
        return os.path.join(results_dir, f"seed{seed}.json")
    return os.path.join(results_dir, "variants", variant.name, f"seed{seed}.json")


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def dense_and_scores(seed: int, work: str, calib_iters: int, log=print):
    """(dense PM-identity model, scores, data) for ``seed``: trained / calibrated once, then read from ``work``.

    The dense training and calibration are the demo's (``run_demo``): same seeds, config and batches."""
    rc = recipe(seed)
    folder = os.path.join(work, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    data = load_data("digits", seed=seed)
    dense_ckpt = os.path.join(folder, "dense.pth")
    if os.path.exists(dense_ckpt):
        dense_pm, _ = load_model(dense_ckpt)
    else:
        t = time.perf_counter()
        torch.manual_seed(seed)
        dense_pm = build_model(DIGITS_VIT, {})
        train(dense_pm, data, rc["dense"], device="cpu")
        save_checkpoint(dense_pm, dense_ckpt, {"model": DIGITS_VIT, "model_kwargs": dict(DIGITS_VIT_KWARGS),
                                               "data": "digits", "seed": seed, "stage": "dense"})
        log(f"seed {seed}: dense trained in {time.perf_counter() - t:.0f} s")
    dense_pm.eval()
    scores_path = os.path.join(folder, f"scores_calib{calib_iters}.pt")
    if os.path.exists(scores_path):
        scores = torch.load(scores_path)
    else:
        loader = make_loader(data.train, rc["demo"].batch_size, train=True, seed=seed + 1)
        scores = calibrate(dense_pm, cycle_batches(loader, calib_iters))
        torch.save(scores, scores_path + ".tmp")
        os.replace(scores_path + ".tmp", scores_path)     # two runs may share the work folder
    return dense_pm, scores, data


def _pm_row(dense_pm, scores, keep, variant, data, ft_cfg, teacher, test_loader) -> dict:
    pm = copy.deepcopy(dense_pm)
    structure = variant_structure(scores, keep, variant)
    install_structure(patch_timm(pm), structure, scores)
    pm.eval()
    before = accuracy(pm, test_loader, "cpu")
    t = time.perf_counter()
    hist = train(pm, data, train_config(variant, ft_cfg), teacher=teacher, device="cpu")
    loss = hist["epoch_loss"][-1]
    ft_s = time.perf_counter() - t
    pm.eval()
    top1 = accuracy(pm, test_loader, "cpu")
    folded = optimize(pm)
    return {"method": "PM", "keep_rate": keep, "prune_rate": prune_rate_for(variant, keep),
            "variant": variant.name, "top1": top1, "top1_before_finetune": before,
            "top1_optimized": accuracy(folded, test_loader, "cpu"),
            "gmacs": analytic_macs(pm) / 1e9,
            "gmacs_optimized_traced": traced_macs(folded, torch.zeros(1, *INPUT)) / 1e9,
            "K_per_layer": kept_tokens(pm),
            "pruned_per_layer": [int(s.pruned.sum()) for s in structure],
            "structure": {"scores": scores.tolist(),
                          "pruned": [torch.nonzero(s.pruned).flatten().tolist() for s in structure],
                          "centres": [torch.nonzero(s.centres).flatten().tolist() for s in structure]},
            "final_train_loss": loss, "finetune_s": ft_s}


def _peer_row(method, dense, target, locs, data, ft_cfg, teacher, test_loader, keep) -> dict:
    d = dims_from_model(dense)
    model = copy.deepcopy(dense)
    if method == "ToMe":
        r, g = match_tome_r(d, target)
        patch_tome(model, r)
        extra = {"r_schedule": r}
    else:
        k, g = match_evit_keep_rate(d, target, locs)
        patch_evit(model, k, locs)
        extra = {"evit_keep_rate": k, "evit_locations": list(locs)}
    model.eval()
    before = accuracy(model, test_loader, "cpu")
    t = time.perf_counter()
    hist = train(model, data, ft_cfg, teacher=teacher, device="cpu")
    ft_s = time.perf_counter() - t
    model.eval()
    info = model._tome_info if method == "ToMe" else model._evit_info
    return dict({"method": method, "keep_rate": keep, "top1": accuracy(model, test_loader, "cpu"),
                 "top1_before_finetune": before, "gmacs": g, "target_gmacs": target,
                 "tokens_per_block": list(info["tokens"]), "final_train_loss": hist["epoch_loss"][-1],
                 "finetune_s": ft_s}, **extra)


def run_seed(seed: int, results_dir: str, work: str, keeps=KEEP_RATES, variant: PMVariant = BASELINE,
             peers: bool = True, env: Optional[dict] = None, log=print) -> dict:
    """Fill ``seed<s>.json`` (or the variant's) with every missing row; returns the file's content."""
    path = seed_path(results_dir, seed, variant)
    rc = recipe(seed)
    ft_cfg = rc["finetune"]
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        same_variant = {k: v for k, v in result["variant"].items() if k != "note"} == \
            {k: v for k, v in variant.to_dict().items() if k != "note"}
        stored = dict(TrainConfig().__dict__, **result["finetune_config"])   # fields added since: at default
        if stored != ft_cfg.__dict__ or not same_variant:
            raise ValueError(f"{path}: written with another recipe or variant; move it away to start over")
    else:
        result = {"seed": seed, "variant": variant.to_dict(), "finetune_config": ft_cfg.__dict__,
                  "dense_config": rc["dense"].__dict__, "rows": {}}
    result.setdefault("runs", []).append({"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                          "env": env or {}})
    dense_pm, scores, data = dense_and_scores(seed, work, variant.calib_iters, log)
    dense = plain_vit(dense_pm, DIGITS_VIT_KWARGS)
    teacher = copy.deepcopy(dense)   # train() freezes the teacher's parameters: never the peers' starting point
    test_loader = make_loader(data.test, 256, train=False)
    result["n_test"] = len(data.test)
    if "dense" not in result["rows"]:
        result["rows"]["dense"] = {"method": "dense", "keep_rate": None, "top1": accuracy(dense, test_loader, "cpu"),
                                   "gmacs": dense_flops(dims_from_model(dense))}
        _write(path, result)
    locs = default_locations(len(dense.blocks))
    for keep in keeps:
        key = f"PM keep {keep:g}"
        if key not in result["rows"]:
            row = _pm_row(dense_pm, scores, keep, variant, data, ft_cfg, teacher, test_loader)
            result["rows"][key] = row
            _write(path, result)
            log(f"seed {seed} {variant.name} {key}: top-1 {row['top1']:.2f} (before FT {row['top1_before_finetune']:.2f})"
                f", GMACs {row['gmacs']:.5f}, K {row['K_per_layer']}, {row['finetune_s']:.0f} s")
        if not peers:
            continue
        target = result["rows"][key]["gmacs"]
        for method in ("ToMe", "EViT"):
            pkey = f"{method} keep {keep:g}"
            if pkey in result["rows"]:
                continue
            row = _peer_row(method, dense, target, locs, data, ft_cfg, teacher, test_loader, keep)
            result["rows"][pkey] = row
            _write(path, result)
            log(f"seed {seed} {pkey}: top-1 {row['top1']:.2f} (before FT {row['top1_before_finetune']:.2f}), "
                f"GMACs {row['gmacs']:.5f}, {row['finetune_s']:.0f} s")
    result["runs"][-1]["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write(path, result)
    return result


def load_seed_files(results_dir: str, variant: PMVariant = BASELINE) -> List[dict]:
    folder = results_dir if variant.name == BASELINE.name else os.path.join(results_dir, "variants", variant.name)
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("seed") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return sorted(out, key=lambda r: r["seed"])
