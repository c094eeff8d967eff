"""Calibration without labels (issue 25): label-free objectives against labelled calibration, digits tasks.

Per seed and task (``classification``: the digits demo's ViT; ``segmentation``: the digits-canvas Segmenter):
1. the demo trains the dense model (``run_demo`` / ``run_seg_demo`` with no keep rate; cached in ``--work``);
2. every variant of ``VARIANTS`` scores the dense model on the demo's calibration images (same loader, same
   order; labels stripped for the label-free ones, which see the model with its head removed: the digits ViT's
   ``reset_classifier(0)`` copy, the Segmenter's backbone); timed, images counted;
3. against the labelled scores: Spearman rank correlation per layer, IoU of the centre sets (and of the pruned
   sets) of the structures at the keep rate, the metric right after compress;
4. ``--finetune`` variants: compress + the demo's fine-tuning recipe (same seed, same teacher) → top-1 / mIoU.
One JSON per task and seed in ``--out`` (resumable: finished variants are kept); ``report`` gathers them:
mean ± std over seeds of each variant's paired difference to labelled calibration.

    python bench/calibration_objectives.py run --task classification --seeds 0 1 2 3 4
    python bench/calibration_objectives.py run --task segmentation --seeds 0 1 2 3 4
    python bench/calibration_objectives.py report
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from pm_kernels import calibrate, compress, search_structure
from pm_kernels.hosts import resolve
from pm_kernels.objectives import FeatureNorm, KMeansTargets, Labels, PseudoLabels, SelfDistillation
from pm_kernels.pipeline.data import cycle_batches, make_loader
from pm_kernels.pipeline.demo import run_demo
from pm_kernels.pipeline.finetune import TrainConfig, train
from pm_kernels.pipeline.tasks import get_task
from pm_kernels.structure import default_prune_rate

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(_ROOT, "bench", "results", "calibration_objectives")
KEEP = {"classification": 0.4, "segmentation": 0.5}
OTHER_IMAGES_SEED = 1000  # the labelled reference's twin on other images: the agreement sampling noise allows

# name → (objective factory, the model it scores: "full" (head / decoder on) or "headless"); None: special
VARIANTS = {
    "labels": (Labels, "full"),
    "labels_other_images": (Labels, "full"),
    "random": (None, None),
    "pseudo_labels": (PseudoLabels, "full"),
    "kmeans_pooled": (lambda: KMeansTargets(level="pooled"), "headless"),
    "kmeans_tokens": (lambda: KMeansTargets(level="tokens"), "headless"),
    "self_distillation_mask_pooled": (lambda: SelfDistillation("mask", level="pooled"), "headless"),
    "self_distillation_mask_tokens": (lambda: SelfDistillation("mask", level="tokens"), "headless"),
    "self_distillation_noise_pooled": (lambda: SelfDistillation("noise", level="pooled"), "headless"),
    "self_distillation_noise_tokens": (lambda: SelfDistillation("noise", level="tokens"), "headless"),
    "feature_norm_pooled": (lambda: FeatureNorm("pooled"), "headless"),
    "feature_norm_tokens": (lambda: FeatureNorm("tokens"), "headless"),
    # the default's sensitivity: clusters, temperature, images fitted (default 16, 0.1, 256)
    "kmeans_pooled_k4": (lambda: KMeansTargets(clusters=4), "headless"),
    "kmeans_pooled_k64": (lambda: KMeansTargets(clusters=64), "headless"),
    "kmeans_pooled_t0.03": (lambda: KMeansTargets(temperature=0.03), "headless"),
    "kmeans_pooled_t0.3": (lambda: KMeansTargets(temperature=0.3), "headless"),
    "kmeans_pooled_fit64": (lambda: KMeansTargets(fit_images=64), "headless"),
}


class Setting:
    """One task and seed: the demo's dense model, data, calibration stream, structure search and fine-tune."""

    def __init__(self, name: str, seed: int, work: str, log, quick: bool = False):
        self.task, self.seed, self.keep = get_task(name), seed, KEEP[name]
        self.cfg = self.task.demo_config(quick, seed=seed, keep_rates=(), speed_repeats=1, n_pictures=1)
        self.data = self.task.demo_data(self.cfg)
        self.test = self.task.eval_loader(self.data, 256)
        folder = os.path.join(work, f"{name}_seed{seed}")
        dense_path = os.path.join(folder, "dense.pth")
        self.dense_train_s = None
        if not os.path.exists(dense_path):  # the demo with no keep rate: the dense model and its labelled scores
            t = time.perf_counter()
            run_demo(self.task, folder, self.cfg, device="cpu", progress=False, log=log)
            self.dense_train_s = time.perf_counter() - t
        self.dense = self.task.load(dense_path)[0].eval()
        host, backbone = resolve(self.dense)
        if backbone is not self.dense:   # a Segmenter: its backbone, which has no head
            self.headless = backbone
        else:                            # the digits ViT as a head-less backbone (num_classes=0)
            self.headless = copy.deepcopy(self.dense)
            host.remove_head(self.headless)
        self.num_prefix = host.num_prefix(backbone)
        prune = self.cfg.prune_rate if self.cfg.prune_rate is not None else default_prune_rate(self.cfg.thresholds)
        self.search = dict(prune_rate=prune, thresholds=self.cfg.thresholds,
                           layers=list(self.cfg.layers) if self.cfg.layers else None)

    def calibration_batches(self, loader_seed_offset: int = 1, iters=None):
        """The demo's calibration stream: the same loader seed and number of batches as its labelled scores."""
        loader = make_loader(self.data.train, self.cfg.batch_size, train=True, seed=self.seed + loader_seed_offset)
        return cycle_batches(loader, iters or self.cfg.calib_iters)

    def structure(self, scores):
        return search_structure(scores, keep_rate=self.keep, num_prefix=self.num_prefix, **self.search)

    def compressed(self, scores):
        return compress(copy.deepcopy(self.dense), scores, keep_rate=self.keep, **self.search)

    def metric(self, model) -> float:
        return self.task.metrics(model, self.test, "cpu")[self.task.headline]

    def finetune(self, model):
        c = self.cfg
        cfg = TrainConfig(epochs=c.ft_epochs, batch_size=c.batch_size, lr=c.ft_lr, alpha=c.alpha, tau=c.tau,
                          seed=c.seed, progress=False)  # the demo's fine-tuning recipe
        if not all(p.requires_grad for p in model.parameters()):
            raise RuntimeError("finetune: the compressed model has frozen weights (a copy of a frozen teacher?)")
        # ``train`` sets requires_grad=False on its teacher's parameters for good: a copy keeps self.dense (the
        # source of every later compressed copy) trainable
        train(model, self.data, cfg, teacher=copy.deepcopy(self.dense), device="cpu",
              base_loss=self.task.loss(model))
        return model.eval()


def score(task: Setting, variant: str, shape, iters=None):
    """(scores, seconds, images) of one variant on the task's calibration stream; ``shape``: (L, patches)."""
    factory, which = VARIANTS[variant]
    if factory is None:  # the control: a random structure
        return torch.rand(*shape, generator=torch.Generator().manual_seed(task.seed)), 0.0, 0
    offset = OTHER_IMAGES_SEED if variant == "labels_other_images" else 1
    model = task.dense if which == "full" else task.headless
    batches = task.calibration_batches(offset, iters)
    if factory is not Labels:
        batches = ((images,) for images, _ in batches)
    seen = [0]

    def counted(stream):
        for b in stream:
            seen[0] += b[0].shape[0]
            yield b

    t = time.perf_counter()
    scores = calibrate(model, counted(batches), objective=factory())
    return scores, time.perf_counter() - t, seen[0]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def iou(a: torch.Tensor, b: torch.Tensor):
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def agreement(task: Setting, scores, reference) -> dict:
    mine, ref = task.structure(scores), task.structure(reference)
    pruned = [iou(m.pruned, r.pruned) for m, r in zip(mine, ref)]
    pruned = [p for p in pruned if p is not None]
    return {"spearman_per_layer": [spearman(s, r) for s, r in zip(scores, reference)],
            "centre_iou_per_layer": [iou(m.centres, r.centres) for m, r in zip(mine, ref)],
            "pruned_iou": statistics.mean(pruned) if pruned else None,
            "same_structure": all(torch.equal(m.centres, r.centres) and torch.equal(m.pruned, r.pruned)
                                  for m, r in zip(mine, ref))}


def run_seed(task_name: str, seed: int, args, log) -> dict:
    path = os.path.join(args.out, f"{task_name}_seed{seed}.json")
    result = json.load(open(path)) if os.path.exists(path) else {"task": task_name, "seed": seed, "variants": {}}
    task = Setting(task_name, seed, args.work, log, args.quick)
    if task.dense_train_s is not None:
        result["dense_train_s"] = task.dense_train_s
    result.update(keep_rate=task.keep, dense_metric=task.metric(task.dense),
                  calibration={"batches": task.cfg.calib_iters, "batch_size": task.cfg.batch_size})
    wanted = [v for v in (args.variants.split(",") if args.variants else VARIANTS)]
    finetuned = set(args.finetune.split(",")) if args.finetune != "all" else set(VARIANTS)
    scores_dir = os.path.join(args.work, f"{task_name}_seed{seed}", "scores")
    os.makedirs(scores_dir, exist_ok=True)
    reference, _, _ = cached_scores(task, "labels", scores_dir, None)
    demo = torch.load(os.path.join(args.work, f"{task_name}_seed{seed}", "scores.pt"))["scores"]
    result["labels_vs_demo_scores_max_rel_diff"] = float((reference - demo).abs().max() / demo.abs().max())
    for variant in wanted:
        row = result["variants"].setdefault(variant, {})
        scores, seconds, images = cached_scores(task, variant, scores_dir, reference.shape)
        if "spearman_per_layer" not in row:
            row.update(agreement(task, scores, reference), seconds=seconds, images=images,
                       metric_before_finetune=task.metric(task.compressed(scores)))
        if variant in finetuned and "metric" not in row:
            same = row["same_structure"] and variant != "labels" and "metric" in result["variants"].get("labels", {})
            if same:  # the labelled structure: fine-tuning is deterministic, its result is the labelled one
                row.update(metric=result["variants"]["labels"]["metric"], finetune_s=0.0, reused_labels=True)
            else:
                t = time.perf_counter()
                row.update(metric=task.metric(task.finetune(task.compressed(scores))),
                           finetune_s=time.perf_counter() - t)
        log(f"{task_name} seed {seed} {variant}: Spearman {statistics.mean(row['spearman_per_layer']):.3f}, "
            f"centre IoU {statistics.mean(row['centre_iou_per_layer']):.3f}, before ft "
            f"{row['metric_before_finetune']:.2f}" + (f", after ft {row['metric']:.2f}" if "metric" in row else ""))
        result["loadavg"] = list(os.getloadavg())
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def cached_scores(task: Setting, variant: str, folder: str, shape):
    path = os.path.join(folder, f"{variant}.pt")
    if os.path.exists(path):
        saved = torch.load(path)
        return saved["scores"], saved["seconds"], saved["images"]
    scores, seconds, images = score(task, variant, shape)
    torch.save({"scores": scores, "seconds": seconds, "images": images}, path)
    return scores, seconds, images


def images_needed(task_name: str, seed: int, args, log) -> dict:
    """Spearman / centre IoU against the labelled reference (the demo's batches) as the batches grow."""
    task = Setting(task_name, seed, args.work, log, args.quick)
    reference, _, _ = cached_scores(task, "labels", os.path.join(args.work, f"{task_name}_seed{seed}", "scores"),
                                    None)
    out = {}
    for variant in args.variants.split(","):
        for iters in (int(n) for n in args.iters.split(",")):
            scores, seconds, images = score(task, variant, reference.shape, iters)
            a = agreement(task, scores, reference)
            out.setdefault(variant, []).append({"batches": iters, "images": images, "seconds": seconds,
                                                "spearman": statistics.mean(a["spearman_per_layer"]),
                                                "centre_iou": statistics.mean(a["centre_iou_per_layer"])})
            log(f"{task_name} seed {seed} {variant} {iters} batches: {out[variant][-1]}")
    return out


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(files) -> dict:
    """Per variant, over seeds: agreement with labelled calibration and paired metric differences to it."""
    summary = {}
    for variant in VARIANTS:
        rows = [(f, f["variants"][variant]) for f in files if variant in f["variants"]]
        if not rows:
            continue
        ref = {f["seed"]: f["variants"]["labels"] for f in files}
        paired = lambda key: [r[key] - ref[f["seed"]][key] for f, r in rows  # noqa: E731
                              if key in r and key in ref[f["seed"]]]
        summary[variant] = {
            "seeds": [f["seed"] for f, _ in rows],
            "spearman": _mean_std([statistics.mean(r["spearman_per_layer"]) for _, r in rows]),
            "spearman_per_layer": [statistics.mean(x) for x in zip(*(r["spearman_per_layer"] for _, r in rows))],
            "centre_iou": _mean_std([statistics.mean(r["centre_iou_per_layer"]) for _, r in rows]),
            "pruned_iou": _mean_std([r["pruned_iou"] for _, r in rows]),
            "before_finetune_minus_labels": _mean_std(paired("metric_before_finetune")),
            "after_finetune": _mean_std([r.get("metric") for _, r in rows]),
            "after_finetune_minus_labels": _mean_std(paired("metric")),
            "seconds": _mean_std([r["seconds"] for _, r in rows]),
            "images": rows[0][1]["images"],
        }
    return summary


def _pm(x, digits=2, sign=False):
    return "–" if x is None else f"{x['mean']:{'+' if sign else ''}.{digits}f} ± {x['std']:.{digits}f}"


def markdown(task_name: str, summary: dict, metric: str) -> str:
    lines = [f"| objective ({task_name}) | seeds (ft) | Spearman (layer mean) | centre IoU | pruned IoU "
             f"| Δ{metric} before ft | {metric} after ft | Δ{metric} after ft (paired) | seconds | images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        ft = s["after_finetune"]["n"] if s["after_finetune"] else 0
        lines.append(f"| {variant} | {len(s['seeds'])} ({ft}) | {_pm(s['spearman'], 3)} | {_pm(s['centre_iou'], 3)} | {_pm(s['pruned_iou'], 3)} "
                     f"| {_pm(s['before_finetune_minus_labels'], sign=True)} | {_pm(s['after_finetune'])} "
                     f"| {_pm(s['after_finetune_minus_labels'], sign=True)} | {_pm(s['seconds'], 1)} "
                     f"| {s['images']} |")
    return "\n".join(lines)


def cmd_report(args) -> dict:
    result = {"command": "python bench/calibration_objectives.py " + " ".join(sys.argv[1:]), "tasks": {}}
    for task_name, metric in (("classification", "top-1"), ("segmentation", "mIoU")):
        names = sorted(n for n in os.listdir(args.out) if n.startswith(task_name + "_seed") and n.endswith(".json"))
        files = [json.load(open(os.path.join(args.out, n))) for n in names]
        if not files:
            continue
        summary = summarize(files)
        result["tasks"][task_name] = {"summary": summary, "keep_rate": files[0]["keep_rate"],
                                      "dense_metric": _mean_std([f["dense_metric"] for f in files]),
                                      "loadavg_per_seed": {f["seed"]: f.get("loadavg") for f in files},
                                      "markdown": markdown(task_name, summary, metric)}
        print(result["tasks"][task_name]["markdown"] + "\n")
        images = os.path.join(args.out, f"images_{task_name}.json")
        if os.path.exists(images):
            result["tasks"][task_name]["images_needed"] = curve = images_summary(json.load(open(images)))
            result["tasks"][task_name]["images_markdown"] = text = images_markdown(task_name, curve)
            print(text + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def images_summary(saved: dict) -> dict:
    """variant → batches → mean ± std over seeds of Spearman / centre IoU against the labelled reference."""
    out = {}
    for per_variant in saved["seeds"].values():
        for variant, rows in per_variant.items():
            for r in rows:
                out.setdefault(variant, {}).setdefault(r["batches"], []).append(r)
    return {v: {b: {"images": rs[0]["images"], "spearman": _mean_std([r["spearman"] for r in rs]),
                    "centre_iou": _mean_std([r["centre_iou"] for r in rs]),
                    "seconds": _mean_std([r["seconds"] for r in rs])} for b, rs in sorted(per.items())}
            for v, per in out.items()}


def images_markdown(task_name: str, curve: dict) -> str:
    batches = sorted({b for per in curve.values() for b in per})
    first = next(iter(curve.values()))
    lines = [f"| Spearman vs labelled ({task_name}); images → | "
             + " | ".join(str(first[b]["images"]) for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for variant, per in curve.items():
        lines.append(f"| {variant} | " + " | ".join(_pm(per[b]["spearman"], 3) for b in batches) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=OUT, help="per-seed JSONs and summary.json")
    p.add_argument("--work", default="/tmp/pm_calibration_objectives", help="dense models and scores per seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the demos' quick budgets (a smoke test, not for results)")
    sub = p.add_subparsers(dest="phase", required=True)
    run = sub.add_parser("run", help="score every variant, compress, fine-tune (resumable)")
    run.add_argument("--task", choices=sorted(KEEP), required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    run.add_argument("--variants", default="", help="comma list (default: all of VARIANTS)")
    run.add_argument("--finetune", default="all", help="variants to fine-tune: a comma list, or all")
    img = sub.add_parser("images", help="agreement with the labelled reference as the calibration batches grow")
    img.add_argument("--task", choices=sorted(KEEP), required=True)
    img.add_argument("--seeds", type=int, nargs="+", default=[0])
    img.add_argument("--variants", default="labels_other_images,kmeans_pooled")
    img.add_argument("--iters", default="1,2,5,10,20,40")
    sub.add_parser("report", help="gather the per-seed JSONs: summary.json and markdown tables")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.phase == "run":
        for seed in args.seeds:
            run_seed(args.task, seed, args, log)
    elif args.phase == "images":
        result = {s: images_needed(args.task, s, args, log) for s in args.seeds}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"images_{args.task}.json"), "w") as f:
            json.dump({"command": "python bench/calibration_objectives.py " + " ".join(sys.argv[1:]),
                       "loadavg": list(os.getloadavg()), "seeds": result}, f, indent=1)
    else:
        return cmd_report(args)


if __name__ == "__main__":
    main()
