"""Prune and Merge vs ToMe-with-unmerge per window on SAM's block pattern (issue 26): digits-canvas segmentation.

Backbone: a small timm ``VisionTransformerSAM`` (32×32 grey canvases, patch 4 → an 8×8 grid; 4 blocks: windowed
(window 4) / global / windowed / global, decomposed relative position, no neck: a final norm) with the
Segmenter mask decoder (2 layers), 11 classes: the digits-canvas task of ``pm_kernels.pipeline.seg_data``.

One seed (``--seed``):
1. the dense Segmenter trained from scratch (the segmentation demo's recipe: 8 epochs, AdamW lr 4e-3, wd 0.05);
2. calibrated (SPEC §3 per window, 20 batches), compressed per layer (SPEC §8 thresholds, no pruning: every
   layer keeps int(keep · 64) centres, spread over its 4 windows, docs/windowed_attention.md §3) at each keep
   rate, fine-tuned with per-pixel distillation from the dense model (2 epochs, lr 5e-4, α 1, T 20);
3. ToMe with unmerge per window (``bench/peers/tome_windowed.py``) on the same dense weights, its per-block r
   (tokens merged per window) chosen so that its analytic backbone MACs are nearest PM's, fine-tuned with the
   same recipe and teacher;
4. mIoU and pixel accuracy on the fixed validation canvases (PM through ``optimize``).

``--summarise FILES``: seeds gathered (mean ± std, paired differences PM − ToMe, PM − dense, ToMe − dense), and
the speed of every model timed here (interleaved rounds, median; speed does not depend on the weights or the
seed: PM's K and ToMe's r are the same for every seed), mIoU at equal speed (each method's mIoU interpolated at
the other's speed along its dense → keep 0.7 → keep 0.5 curve).

    python bench/sam_seg_peers.py --seed 0 --out bench/results/sam_windowed/seed0.json
    python bench/sam_seg_peers.py --summarise bench/results/sam_windowed/seed*.json \\
        --out bench/results/sam_windowed/summary.json
"""
import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pm_kernels  # noqa: E402
from pm_kernels import Segmenter  # noqa: E402
from pm_kernels.measure import environment, finish_environment, forward, pm_macs, time_interleaved  # noqa: E402
from pm_kernels.measure import traced_macs  # noqa: E402
from pm_kernels.pipeline.data import cycle_batches, make_loader  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, train  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation import seg_loss, segmentation_metrics  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation_data import digits_segmentation  # noqa: E402
from bench.peers.tome_windowed import patch_tome_windowed, tome_windowed_macs, tome_windowed_tokens  # noqa: E402

SAM_SEG_KWARGS = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
                      window_size=4, global_attn_indexes=(1, 3), use_rel_pos=True, neck_chans=0, num_classes=0)
GRID = (8, 8)
CLASSES = 11
DENSE = dict(epochs=8.0, batch_size=32, lr=4e-3, weight_decay=0.05, warmup_iters=40, alpha=0.0,
             freeze_structure=True, progress=False)
FINETUNE = dict(epochs=2.0, batch_size=32, lr=5e-4, alpha=1.0, tau=20.0, progress=False)


def sam_segmenter(patched: bool) -> Segmenter:
    from timm.models.vision_transformer_sam import VisionTransformerSAM
    backbone = VisionTransformerSAM(**SAM_SEG_KWARGS)
    if patched:
        pm_kernels.patch(backbone)
    return Segmenter(backbone, CLASSES, "mask", decoder_depth=2, dropout=0.0)


def decoder_gmacs(seg: Segmenter) -> float:
    tokens = torch.zeros(1, GRID[0] * GRID[1], SAM_SEG_KWARGS["embed_dim"])
    return traced_macs(lambda t: seg.decoder.eval()(t, GRID), tokens) / 1e9


def traced_gmacs(model) -> float:
    return traced_macs(model, torch.zeros(1, 1, 32, 32)) / 1e9


def match_r(plain_backbone, target_macs: float):
    """The per-block r (tokens merged per window) whose analytic MACs are nearest ``target_macs``; ties: the
    schedule with the smallest spread."""
    slots = SAM_SEG_KWARGS["window_size"] ** 2
    probe = copy.deepcopy(plain_backbone)
    patch_tome_windowed(probe, [0] * len(probe.blocks))
    best = None
    for r in itertools.product(range(slots // 2 + 1), repeat=len(probe.blocks)):
        macs = tome_windowed_macs(probe, GRID, r)
        key = (abs(macs - target_macs), max(r) - min(r))
        if best is None or key < best[0]:
            best = (key, list(r), macs)
    return best[1], best[2]


def plain_copy(dense: Segmenter) -> Segmenter:
    """The dense Segmenter on an unpatched timm SAM (the same weights)."""
    seg = sam_segmenter(patched=False)
    seg.load_state_dict(dense.state_dict(), strict=True)
    return seg.eval()


def run_seed(seed: int, out: str, keep_rates, quick: bool = False):
    env = environment("cpu")
    t0 = time.perf_counter()
    timings = {}
    data = digits_segmentation(img_size=32, n_train=64 if quick else 4000, n_val=16 if quick else 300)
    if quick:  # a smoke test of the script, not a result
        DENSE.update(epochs=1.0, warmup_iters=1)
        FINETUNE.update(epochs=1.0)
    val = make_loader(data.test, 64, train=False)
    torch.manual_seed(seed)
    dense = sam_segmenter(patched=True)
    t = time.perf_counter()
    train(dense, data, TrainConfig(seed=seed, **DENSE), device="cpu", base_loss=seg_loss())
    timings["train_dense_s"] = time.perf_counter() - t
    calib = make_loader(data.train, 32, train=True, seed=seed + 1)
    scores = pm_kernels.calibrate(dense, cycle_batches(calib, 2 if quick else 20))
    dec = decoder_gmacs(dense)
    n = GRID[0] * GRID[1]
    dense_macs = pm_macs(dense.backbone, [n] * SAM_SEG_KWARGS["depth"]) / 1e9
    rows = []

    def add(method, keep, runner, backbone_gmacs, extra):
        m = segmentation_metrics(runner, val, CLASSES, "cpu")
        rows.append(dict(method=method, keep_rate=keep, miou=m["miou"], pixel_acc=m["pixel_acc"],
                         backbone_gmacs=backbone_gmacs, gmacs=backbone_gmacs + dec, traced_gmacs=traced_gmacs(runner),
                         **extra))
        print(f"seed {seed} {method} keep={keep}: mIoU {m['miou']:.2f} ({backbone_gmacs + dec:.5f} GMACs)",
              flush=True)

    add("dense", None, dense, dense_macs, {})
    for keep in keep_rates:
        pm = copy.deepcopy(dense)
        pm_kernels.compress(pm, scores, keep_rate=keep, prune_rate=0.0, thresholds="per_layer")
        before = segmentation_metrics(pm, val, CLASSES, "cpu")["miou"]
        t = time.perf_counter()
        train(pm, data, TrainConfig(seed=seed, **FINETUNE), teacher=dense, device="cpu", base_loss=seg_loss())
        timings[f"finetune_PM_keep{keep:g}_s"] = time.perf_counter() - t
        kept = [b.num_kept(n) for b in pm.backbone.blocks]
        target = pm_macs(pm.backbone, kept) / 1e9
        add("PM", keep, pm_kernels.optimize(pm), target,
            dict(miou_before_finetune=before, kept_per_block=kept,
                 K_per_window=[b.M.shape[1] for b in pm.backbone.blocks]))

        tome = plain_copy(dense)
        r, macs = match_r(tome.backbone, target * 1e9)
        patch_tome_windowed(tome.backbone, r)
        before = segmentation_metrics(tome, val, CLASSES, "cpu")["miou"]
        t = time.perf_counter()
        train(tome, data, TrainConfig(seed=seed, **FINETUNE), teacher=dense, device="cpu", base_loss=seg_loss())
        timings[f"finetune_ToMe_keep{keep:g}_s"] = time.perf_counter() - t
        add("ToMe", keep, tome, macs / 1e9,
            dict(miou_before_finetune=before, r_per_block=r,
                 tokens_per_window=tome_windowed_tokens(SAM_SEG_KWARGS["window_size"] ** 2, r)))
    timings["total_s"] = time.perf_counter() - t0
    result = {"command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + sys.argv[1:]),
              "seed": seed, "env": finish_environment(env),
              "backbone": {k: list(v) if isinstance(v, tuple) else v for k, v in SAM_SEG_KWARGS.items()},
              "dense_train": DENSE, "finetune": FINETUNE, "calibration": "20 batches of 32, per-pixel CE",
              "compress": "per_layer thresholds, prune_rate 0", "n_train": len(data.train), "n_val": len(data.test),
              "gmacs": "backbone: pm_macs (PM), tome_windowed_macs (ToMe), pm_macs of the identity (dense); + the "
                       "decoder (FlopCounterMode); traced_gmacs: FlopCounterMode of what runs (PM: optimize)",
              "rows": rows, "timings": timings}
    save_json(result, os.path.abspath(out))
    print(f"wrote {out} ({timings['total_s']:.0f} s)")


def mean_std(values):
    values = list(values)
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _interpolate(speed: float, curve):
    """mIoU at ``speed`` along a method's (speed, mIoU) points (linear; None outside their span)."""
    curve = sorted(curve)
    for (s0, m0), (s1, m1) in zip(curve, curve[1:]):
        if s0 <= speed <= s1:
            return m0 + (m1 - m0) * (speed - s0) / (s1 - s0) if s1 > s0 else m0
    return None


def summarise(files, out: str, rounds: int):
    runs = [json.load(open(f)) for f in files]
    keeps = sorted({r["keep_rate"] for r in runs[0]["rows"] if r["keep_rate"] is not None}, reverse=True)
    by_seed = [{(r["method"], r["keep_rate"]): r for r in run["rows"]} for run in runs]
    table, paired = {}, {}
    for key in [("dense", None)] + [(m, k) for k in keeps for m in ("PM", "ToMe")]:
        rows = [s[key] for s in by_seed]
        table[f"{key[0]}" + ("" if key[1] is None else f" keep {key[1]:g}")] = {
            "miou": mean_std(r["miou"] for r in rows), "gmacs": rows[0]["gmacs"],
            "miou_before_finetune": mean_std(r.get("miou_before_finetune", r["miou"]) for r in rows),
            **({"r_per_block": rows[0]["r_per_block"]} if "r_per_block" in rows[0] else {}),
            **({"K_per_window": rows[0]["K_per_window"]} if "K_per_window" in rows[0] else {})}
    for keep in keeps:
        diff = lambda a, b: mean_std(s[a]["miou"] - s[b]["miou"] for s in by_seed)  # noqa: E731
        paired[f"keep {keep:g}"] = {"PM_minus_ToMe": diff(("PM", keep), ("ToMe", keep)),
                                    "PM_minus_dense": diff(("PM", keep), ("dense", None)),
                                    "ToMe_minus_dense": diff(("ToMe", keep), ("dense", None))}
    # speed: fresh models (random weights, the structures every seed has), interleaved rounds
    torch.set_num_threads(1)
    env = environment("cpu")
    dense = sam_segmenter(patched=True).eval()
    models = {"dense": dense}
    scores = torch.rand(SAM_SEG_KWARGS["depth"], GRID[0] * GRID[1]) + 0.1
    for keep in keeps:
        pm = copy.deepcopy(dense)
        pm_kernels.compress(pm, scores, keep_rate=keep, prune_rate=0.0, thresholds="per_layer")
        models[f"PM keep {keep:g}"] = pm_kernels.optimize(pm)
        tome = plain_copy(dense)
        patch_tome_windowed(tome.backbone, table[f"ToMe keep {keep:g}"]["r_per_block"])
        models[f"ToMe keep {keep:g}"] = tome.eval()
    x = torch.randn(32, 1, 32, 32)
    rates = time_interleaved({name: forward(m, x) for name, m in models.items()}, items=32, rounds=rounds,
                             min_time=0.3, warmup=2)
    speed = {name: r.median for name, r in rates.items()}
    for name, r in rates.items():
        table[name].update(r.to_dict())
        table[name]["speedup"] = r.median / speed["dense"]
    equal_speed = {}
    for method, other in (("PM", "ToMe"), ("ToMe", "PM")):
        curve = [(speed["dense"], table["dense"]["miou"]["mean"])] + [
            (speed[f"{method} keep {k:g}"], table[f"{method} keep {k:g}"]["miou"]["mean"]) for k in keeps]
        for k in keeps:
            at = speed[f"{other} keep {k:g}"]
            equal_speed[f"{method} at the speed of {other} keep {k:g}"] = {
                "images_per_s": at, "miou": _interpolate(at, curve),
                f"{other}_miou": table[f"{other} keep {k:g}"]["miou"]["mean"]}
    lines = [f"{'model':<14} {'GMACs':>8} {'mIoU (mean ± std)':>18} {'before FT':>10} {'img/s':>7} {'speed-up':>8}"]
    for name, row in table.items():
        m, b = row["miou"], row["miou_before_finetune"]
        lines.append(f"{name:<14} {row['gmacs']:>8.5f} {m['mean']:>9.2f} ± {m['std']:<5.2f} {b['mean']:>10.2f} "
                     f"{row['images_per_s']:>7.0f} {row['speedup']:>7.2f}x")
    for keep, d in paired.items():
        lines.append(f"{keep}: PM − ToMe {d['PM_minus_ToMe']['mean']:+.2f} ± {d['PM_minus_ToMe']['std']:.2f}, "
                     f"PM − dense {d['PM_minus_dense']['mean']:+.2f} ± {d['PM_minus_dense']['std']:.2f}, "
                     f"ToMe − dense {d['ToMe_minus_dense']['mean']:+.2f} ± {d['ToMe_minus_dense']['std']:.2f}")
    for name, d in equal_speed.items():
        got = "outside its measured span" if d["miou"] is None else f"{d['miou']:.2f}"
        lines.append(f"{name} ({d['images_per_s']:.0f} img/s): {got}")
    text = "\n".join(lines)
    print(text)
    result = {"command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + sys.argv[1:]),
              "seeds": [run["seed"] for run in runs], "files": [os.path.relpath(f, _ROOT) for f in files],
              "env": finish_environment(env),
              "speed": {"batch": 32, "rounds": rounds, "min_time_s": 0.3,
                        "how": "no-grad forwards of a random batch; each round times every model once; median"},
              "table": table, "paired": paired, "equal_speed": equal_speed, "text": text}
    save_json(result, os.path.abspath(out))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--summarise", nargs="+", metavar="FILE", help="gather these seeds' JSON files and time")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke test of the script (tiny data, 1 epoch)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summarise:
        summarise(args.summarise, args.out, args.rounds)
    else:
        run_seed(args.seed, args.out, args.keep_rates, args.quick)


if __name__ == "__main__":
    main()
