"""Segmentation side by side (issue 12): Prune-and-Merge vs ToMe-with-unmerge at matched GMACs, digits canvases.

1. The segmentation demo (``pm_kernels.pipeline.demo.run_demo`` of the segmentation task, ``--seed``) runs into
   ``--work`` (or is reused from there when that folder holds a finished run of the same seed): dense Segmenter
   trained, calibrated, compressed per layer at keep 0.8 / 0.7 / 0.5, fine-tuned with per-pixel distillation.
2. For each keep rate, ToMe with unmerge (``bench/peers/tome_seg.py``: ToMe's merging in every block, merged
   tokens copied back to their source positions before the decoder) gets a per-block r schedule whose analytic
   backbone GMACs match the PM backbone's (``match_tome_r``; PM's merge / reconstruct products and ToMe's matching
   counted), is built on the same dense weights (plain timm ViT + the same decoder) and fine-tuned with the PM
   run's exact ``TrainConfig`` from the same dense teacher (per-pixel CE + per-pixel KL).
3. Every row on the fixed validation canvases: mIoU, pixel accuracy, GMACs (analytic backbone + the decoder, and
   the traced count as a cross-check), CPU images/s (PM through ``optimize``; same batch and threads;
   ``pm_kernels.measure.time_interleaved``, median over rounds).

    python bench/seg_peers.py --seed 0 --work runs/seg_seed0 --out bench/results/seg_seeds/seed0.json

``bench/seg_peers_summary.py`` gathers the seeds (mean ± std, paired differences).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.common import plain_segmenter  # noqa: E402
from bench.peers import dense_flops, dims_from_model, match_tome_r  # noqa: E402
from bench.peers.flops import tome_flops  # noqa: E402
from bench.peers.tome_seg import patch_tome_seg  # noqa: E402
from pm_kernels import optimize  # noqa: E402
from pm_kernels.measure import (analytic_macs, environment, finish_environment, forward, kept_tokens,  # noqa: E402
                                time_interleaved, traced_macs)
from pm_kernels.pipeline.data import make_loader  # noqa: E402
from pm_kernels.pipeline.demo import run_demo  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, train  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402
from pm_kernels.pipeline.tasks import TASKS  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation import load_segmenter, seg_loss, segmentation_metrics  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation_data import digits_segmentation  # noqa: E402

TASK = TASKS["segmentation"]


def decoder_gmacs(seg, in_shape) -> float:
    """MACs of the decoder alone (the same for every backbone: all patch tokens reach it)."""
    h, w = (s // p for s, p in zip(in_shape[1:], seg.patch_size))
    tokens = torch.zeros(1, h * w, seg.backbone.embed_dim)
    return traced_macs(lambda t: seg.decoder.eval()(t, (h, w)), tokens) / 1e9


def flat_config(cfg) -> dict:
    """The demo config with its data and model options at the top level (the layout of the seed files)."""
    flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
            if k not in ("data_options", "model_options")}
    return dict(flat, **cfg.data_options, **cfg.model_options)


def _reuse_or_run(work: str, cfg):
    path = os.path.join(work, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            demo = json.load(f)
        done = demo.get("config", {})
        done = dict(done, **done.get("data_options", {}))  # this layout, or the older flat one
        same = all(done.get(k, 0.0) == v for k, v in (("seed", cfg.seed),
                                                       ("background_noise", cfg.data_options["background_noise"])))
        if same and all(os.path.exists(os.path.join(work, f"pm_keep{k:g}.pth")) for k in cfg.keep_rates):
            print(f"[demo] reusing the finished run in {work}", flush=True)
            return demo
    return run_demo(TASK, work, cfg, device="cpu", progress=False, log=lambda m: print(f"[demo] {m}", flush=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", required=True, help="the demo's folder (reused when it holds a finished run)")
    p.add_argument("--out", required=True, help="result JSON (a .png of mIoU vs GMACs next to it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run")
    p.add_argument("--background-noise", type=float, default=0.0,
                   help="an ablation: a uniform noise below the ink threshold on every canvas pixel")
    p.add_argument("--quick", action="store_true", help="the demo's quick budget (smoke test, not for results)")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = TASK.demo_config(quick=args.quick, seed=args.seed)
    cfg.data_options = dict(cfg.data_options, background_noise=args.background_noise)
    env = environment("cpu")
    timings = {}
    t = time.perf_counter()
    demo = _reuse_or_run(args.work, cfg)
    timings["demo_s"] = time.perf_counter() - t

    dense_pm, meta = load_segmenter(os.path.join(args.work, "dense.pth"))
    dense_pm.eval()
    dense = plain_segmenter(dense_pm, meta["model_kwargs"])
    d = dims_from_model(dense.backbone)
    size = cfg.data_options["img_size"]
    in_shape = (1, size, size)
    dec = decoder_gmacs(dense, in_shape)
    data = digits_segmentation(**cfg.data_options)
    val = make_loader(data.test, 64, train=False)
    rows, timed = [], []

    def add(method, keep, model, runner, backbone_gmacs, setting, extra=None):
        m = segmentation_metrics(runner, val, data.num_classes, "cpu")
        row = {"method": method, "keep_rate": keep, "miou": m["miou"], "pixel_acc": m["pixel_acc"],
               "backbone_gmacs": backbone_gmacs, "gmacs": backbone_gmacs + dec,
               "gmacs_flopcounter": traced_macs(runner, torch.zeros(1, *in_shape)) / 1e9, "setting": setting}
        row.update(extra or {})
        rows.append(row)
        timed.append(runner)
        print(f"{method} keep={keep}: mIoU {row['miou']:.2f}, GMACs {row['gmacs']:.5f}", flush=True)

    add("dense", None, dense, dense, dense_flops(d), "plain timm ViT + mask decoder")
    demo_rows = {r["model"]: r for r in demo["rows"]}
    ft_cfg = None
    for keep in cfg.keep_rates:
        pm, pm_meta = load_segmenter(os.path.join(args.work, f"pm_keep{keep:g}.pth"))
        pm.eval()
        ft_cfg = TrainConfig(**pm_meta["train"]["config"])
        ft_cfg.progress = False
        target = analytic_macs(pm.backbone) / 1e9
        ks = kept_tokens(pm.backbone)
        add("PM", keep, pm, optimize(pm), target, f"K per block {ks} (N = {d.num_tokens}), per-layer thresholds",
            {"K_per_layer": ks, "miou_before_finetune": demo_rows[f"PM keep {keep:g}"].get("miou_before_finetune"),
             "miou_in_demo": demo_rows[f"PM keep {keep:g}"]["miou"]})

        r, g_tome = match_tome_r(d, target)
        tome = copy.deepcopy(dense)
        patch_tome_seg(tome.backbone, r)
        tome.eval()
        before = segmentation_metrics(tome, val, data.num_classes, "cpu")["miou"]
        t = time.perf_counter()
        hist = train(tome, data, ft_cfg, teacher=dense_pm, device="cpu", base_loss=seg_loss())
        timings[f"finetune_ToMe_keep{keep:g}_s"] = time.perf_counter() - t
        tome.eval()
        add("ToMe", keep, tome, tome, g_tome, f"r per block {r}, unmerged before the decoder",
            {"r_schedule": r, "target_backbone_gmacs": target, "miou_before_finetune": before,
             "tokens_per_block": list(tome.backbone._tome_info["tokens"]), "final_train_loss": hist["epoch_loss"][-1],
             "tome_backbone_gmacs_check": tome_flops(d, r)})

    t = time.perf_counter()
    x = torch.randn(cfg.batch_size, *in_shape)
    rates = time_interleaved({i: forward(m, x) for i, m in enumerate(timed)}, items=cfg.batch_size,
                             rounds=args.rounds, min_time=args.min_time, warmup=2)
    timings["speed_s"] = time.perf_counter() - t
    for i, row in enumerate(rows):
        row.update(rates[i].to_dict())
    base = rows[0]
    for row in rows:
        row["delta_miou"] = row["miou"] - base["miou"]
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        row["gmacs_vs_dense"] = row["gmacs"] / base["gmacs"]
    table = format_rows(rows)
    print(table)
    compare = {}
    for keep in cfg.keep_rates:
        by = {r["method"]: r for r in rows if r["keep_rate"] == keep}
        compare[f"keep {keep:g}"] = {"PM_miou": by["PM"]["miou"], "ToMe_miou": by["ToMe"]["miou"],
                                     "PM_minus_ToMe": by["PM"]["miou"] - by["ToMe"]["miou"],
                                     "PM_minus_dense": by["PM"]["miou"] - base["miou"],
                                     "PM_gmacs": by["PM"]["gmacs"], "ToMe_gmacs": by["ToMe"]["gmacs"]}
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + list(
            sys.argv[1:] if argv is None else argv)),
        "env": finish_environment(env),
        "config": flat_config(cfg),
        "model_kwargs": meta["model_kwargs"],
        "finetune_config": ft_cfg.__dict__ if ft_cfg is not None else None,
        "gmacs_counter": "analytic backbone (1 MAC = 1 FLOP: PM pm_kernels.measure, merge/reconstruct included; "
                         "ToMe bench/peers/flops.py, matching included) + the decoder (traced, the same for every "
                         "row); gmacs_flopcounter = traced count of what runs (PM: the optimized model)",
        "speed": {"batch": cfg.batch_size, "input": list(in_shape), "rounds": args.rounds,
                  "min_time_s": args.min_time, "how": "pm_kernels.measure.time_interleaved: no-grad forwards of a "
                                                      "random batch; interleaved rounds; median"},
        "n_train": len(data.train), "n_val": len(data.test), "rows": rows, "table": table, "compare": compare,
        "timings": timings,
    }
    out = save_json(result, os.path.abspath(args.out))
    for k, v in compare.items():
        print(f"{k}: PM {v['PM_miou']:.2f} vs ToMe {v['ToMe_miou']:.2f} mIoU (PM - ToMe {v['PM_minus_ToMe']:+.2f}); "
              f"PM - dense {v['PM_minus_dense']:+.2f}")
    print(f"wrote {out}; total {timings['total_s']:.1f} s")
    return result


def format_rows(rows) -> str:
    header = (f"{'method':<6} {'keep':>5} {'GMACs':>8} {'mIoU %':>7} {'Δ mIoU':>7} {'pix acc':>7} {'img/s':>8} "
              f"{'speed-up':>8}  setting")
    lines = [header, "-" * (len(header) + 30)]
    for r in rows:
        keep = "-" if r["keep_rate"] is None else f"{r['keep_rate']:g}"
        lines.append(f"{r['method']:<6} {keep:>5} {r['gmacs']:>8.5f} {r['miou']:>7.2f} {r['delta_miou']:>+7.2f} "
                     f"{r['pixel_acc']:>7.2f} {r['images_per_s']:>8.1f} {r['speedup']:>7.2f}x  {r['setting']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
