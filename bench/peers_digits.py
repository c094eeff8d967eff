"""Accuracy side-by-side on the digits task (issue 6): Prune-and-Merge vs ToMe vs EViT at matched GMACs.

1. The digits demo (``pm_kernels.pipeline.demo.run_demo``, the classification task's defaults) runs once, into a
   scratch folder: it trains the dense digits ViT, calibrates, compresses at each keep rate (0.6, 0.4) and
   fine-tunes PM with distillation from the dense model. Its checkpoints (``dense.pth``,
   ``pm_keep*.pth``) are loaded back: the PM rows are the demo's own models.
2. For each keep rate, ToMe (``bench/peers/tome.py``, per-block r schedule from ``match_tome_r``) and EViT
   (``bench/peers/evit.py``, one keep rate at blocks 1, 2, 3 of the 4-block ViT, i.e. the paper's
   "quarters of the depth" ``default_locations(4)``, from ``match_evit_keep_rate``) are set to the PM
   model's analytic GMACs, built on the same dense weights (a plain timm ``VisionTransformer``), and
   fine-tuned with the PM run's exact ``TrainConfig`` (read back from its checkpoint: same epochs, lr,
   batch, seed, distillation α and T) from the same dense teacher.
3. Every row is evaluated on the held-out split: top-1, GMACs (analytic, 1 MAC = 1 FLOP, overheads included:
   PM's merge / reconstruct by ``pm_kernels.measure``, ToMe's matching and EViT's fusion by
   ``bench/peers/flops.py``; the traced count is kept in the JSON as a cross-check) and CPU images/s
   (``pm_kernels.measure.time_interleaved``: same thread count and batch for all, interleaved rounds, median).
   The dense row is the plain timm ViT with the dense weights (the PM-identity copy computes the same
   function but pays for M = R = I products).

    python bench/peers_digits.py --out bench/results/peers_digits_CPU.json

Writes the JSON and the same path with ``.png`` (top-1 vs GMACs, dense marked).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.common import plain_vit  # noqa: E402
from bench.peers import (default_locations, dense_flops, dims_from_model, match_evit_keep_rate,  # noqa: E402
                         match_tome_r, patch_evit, patch_tome)
from pm_kernels.measure import (analytic_macs, environment, finish_environment, forward, kept_tokens,  # noqa: E402
                                time_interleaved, traced_macs)
from pm_kernels.pipeline.demo import run_demo  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, train  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402
from pm_kernels.pipeline.tasks import TASKS  # noqa: E402
from pm_kernels.pipeline.tasks.classification import accuracy  # noqa: E402

TASK = TASKS["classification"]
INPUT = (1, 32, 32)


def format_rows(rows) -> str:
    header = (f"{'method':<7} {'keep':>5} {'GMACs':>8} {'top-1 %':>8} {'Δ top-1':>8} {'img/s':>8} {'speed-up':>8}"
              f"  {'no-FT top-1':>11}  setting")
    lines = [header, "-" * (len(header) + 20)]
    for r in rows:
        keep = "-" if r["keep_rate"] is None else f"{r['keep_rate']:g}"
        noft = "-" if r.get("top1_before_finetune") is None else f"{r['top1_before_finetune']:.2f}"
        lines.append(f"{r['method']:<7} {keep:>5} {r['gmacs']:>8.5f} {r['top1']:>8.2f} {r['delta_top1']:>+8.2f} "
                     f"{r['images_per_s']:>8.0f} {r['speedup']:>7.2f}x  {noft:>11}  {r['setting']}")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=130)
    styles = {"PM": ("o-", "C0", "Prune-and-Merge"), "ToMe": ("^-", "C1", "ToMe"),
              "EViT": ("v-", "C2", f"EViT (blocks {','.join(map(str, result['evit_locations']))})")}
    for method, (fmt, color, label) in styles.items():
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["gmacs"])
        if not rs:
            continue
        ax.plot([r["gmacs"] * 1e3 for r in rs], [r["top1"] for r in rs], fmt, color=color, label=label)
        for r in rs:
            ax.annotate(f"{r['top1']:.1f} (keep {r['keep_rate']:g})", (r["gmacs"] * 1e3, r["top1"]),
                        textcoords="offset points", xytext=(4, -10 if method == "EViT" else 5), fontsize=6,
                        color=color)
    ax.plot([dense["gmacs"] * 1e3], [dense["top1"]], "*", ms=14, color="C3", label=f"dense ({dense['top1']:.1f})")
    ax.axhline(dense["top1"], color="C3", lw=0.8, ls="--")
    ax.set_xlabel("MMACs / image (analytic, 1 MAC = 1 FLOP)")
    ax.set_ylabel("top-1 on the held-out split (%)")
    env = result["env"]
    load = env.get("load_average_start", env.get("loadavg_start"))
    ax.set_title(f"digits ViT (4 blocks, 65 tokens), {result['n_test']} test images, seed {result['config']['seed']}:"
                 f"\nall fine-tuned {result['config']['ft_epochs']:g} epochs with distillation from the same dense "
                 f"model\n[CPU] {env['cpu_name']}, {env['threads']} thread(s), load average "
                 f"{load[0]:.1f} on {env['cpu_count']} cores (shared)", fontsize=7)
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(_ROOT, "bench", "results", "peers_digits_CPU.json"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and timing)")
    p.add_argument("--seed", type=int, default=None, help="default: the demo's (0)")
    p.add_argument("--evit-locations", default=None,
                   help="comma list of 0-based blocks (default: default_locations(4) = 1,2,3)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run")
    p.add_argument("--work", default=None, help="folder for the demo's checkpoints (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="the demo's QUICK budget (smoke test, not for results)")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = TASK.demo_config(quick=args.quick)
    if args.seed is not None:
        cfg.seed = args.seed
    env = environment("cpu")

    work_ctx = tempfile.TemporaryDirectory(prefix="peers_digits_") if args.work is None else None
    work = work_ctx.name if work_ctx else args.work
    os.makedirs(work, exist_ok=True)
    timings = {}

    # 1. the demo: dense training, calibration, PM compression + distillation fine-tuning
    t = time.perf_counter()
    demo = run_demo(TASK, work, cfg, device="cpu", progress=False, log=lambda m: print(f"[demo] {m}", flush=True))
    timings["demo_s"] = time.perf_counter() - t

    dense_pm, meta = TASK.load(os.path.join(work, "dense.pth"))
    kwargs = meta["model_kwargs"]
    dense = plain_vit(dense_pm, kwargs)
    d = dims_from_model(dense)
    data = TASK.demo_data(cfg)
    test_loader = TASK.eval_loader(data, 256)
    locs = default_locations(d.depth) if args.evit_locations is None else \
        [int(s) for s in args.evit_locations.split(",") if s]

    rows, models = [], []

    def add(method, keep, model, gmacs, setting, extra=None):
        row = {"method": method, "keep_rate": keep, "gmacs": gmacs, "setting": setting,
               "top1": accuracy(model, test_loader, "cpu"),
               "gmacs_flopcounter": traced_macs(model, torch.zeros(1, *INPUT)) / 1e9}
        row.update(extra or {})
        rows.append(row)
        models.append(model)
        print(f"{method} keep={keep}: top-1 {row['top1']:.2f}, GMACs {gmacs:.5f}", flush=True)
        return row

    add("dense", None, dense, dense_flops(d), "plain timm ViT",
        {"top1_pm_identity_copy": accuracy(dense_pm, test_loader, "cpu")})

    demo_rows = {r["model"]: r for r in demo["rows"]}
    for keep in cfg.keep_rates:
        pm, pm_meta = TASK.load(os.path.join(work, f"pm_keep{keep:g}.pth"))
        pm.eval()
        ft_cfg = TrainConfig(**pm_meta["train"]["config"])
        target = analytic_macs(pm) / 1e9
        ks = kept_tokens(pm)
        demo_row = demo_rows[f"PM keep {keep:g}"]
        add("PM", keep, pm, target, f"K per block {ks} (N = {d.num_tokens})",
            {"K_per_layer": ks, "prune_rate": cfg.prune_rate, "top1_before_finetune": demo_row["top1_before_finetune"],
             "top1_in_demo": demo_row["top1"]})

        r, g_tome = match_tome_r(d, target)
        k_evit, g_evit = match_evit_keep_rate(d, target, locs)
        for method, build, g, setting, extra in (
                ("ToMe", lambda: patch_tome(copy.deepcopy(dense), r), g_tome, f"r per block {r}",
                 {"r_schedule": r}),
                ("EViT", lambda: patch_evit(copy.deepcopy(dense), k_evit, locs), g_evit,
                 f"keep {k_evit:g} ({round(k_evit * d.num_patches)}/{d.num_patches}) at blocks "
                 f"{','.join(map(str, locs))}", {"evit_keep_rate": k_evit, "evit_locations": locs})):
            model = build().eval()
            before = accuracy(model, test_loader, "cpu")
            t = time.perf_counter()
            hist = train(model, data, ft_cfg, teacher=dense_pm, device="cpu")
            timings[f"finetune_{method}_keep{keep:g}_s"] = time.perf_counter() - t
            model.eval()
            add(method, keep, model, g, setting,
                dict(extra, target_gmacs=target, top1_before_finetune=before,
                     tokens_per_block=list(model._tome_info["tokens"] if method == "ToMe"
                                           else model._evit_info["tokens"]),
                     final_train_loss=hist["epoch_loss"][-1]))

    # 3. speed: interleaved rounds, same batch and threads for every model
    t = time.perf_counter()
    x = torch.randn(cfg.batch_size, *INPUT)
    rates = time_interleaved({i: forward(m, x) for i, m in enumerate(models)}, items=cfg.batch_size,
                             rounds=args.rounds, min_time=args.min_time, warmup=3)
    timings["speed_s"] = time.perf_counter() - t
    dense_row = rows[0]
    for i, row in enumerate(rows):
        row.update(rates[i].to_dict())
    for row in rows:
        row["delta_top1"] = row["top1"] - dense_row["top1"]
        row["speedup"] = row["images_per_s"] / dense_row["images_per_s"]
        row["gmacs_vs_dense"] = row["gmacs"] / dense_row["gmacs"]

    table = format_rows(rows)
    print(table)

    target = {}
    for keep in cfg.keep_rates:
        by = {r["method"]: r["top1"] for r in rows if r["keep_rate"] == keep}
        best = max(by["ToMe"], by["EViT"])
        target[f"keep {keep:g}"] = {"PM": by["PM"], "ToMe": by["ToMe"], "EViT": by["EViT"],
                                    "PM_at_least_as_accurate": by["PM"] >= best,
                                    "PM_minus_best_peer_images": round((by["PM"] - best) * len(data.test) / 100)}
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + list(
            sys.argv[1:] if argv is None else argv)),
        "env": finish_environment(env),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "finetune_config": ft_cfg.__dict__ if cfg.keep_rates else None,
        "evit_locations": locs,
        "gmacs_counter": "analytic (1 MAC = 1 FLOP): PM pm_kernels.measure (merge/reconstruct included), ToMe / EViT "
                         "bench/peers/flops.py (matching, fusion included); gmacs_flopcounter = traced (cross-check)",
        "speed": {"batch": cfg.batch_size, "rounds": args.rounds, "min_time_s": args.min_time,
                  "how": "pm_kernels.measure.time_interleaved: no-grad forwards of a random batch; each round times "
                         "every model once, the order reversed every other round; median"},
        "n_train": len(data.train), "n_test": len(data.test),
        "rows": rows, "table": table, "target_PM_at_least_as_accurate": target, "timings": timings,
    }
    out = save_json(result, os.path.abspath(args.out))
    png = os.path.splitext(out)[0] + ".png"
    plot(result, png)
    for k, v in target.items():
        print(f"target at {k}: PM {v['PM']:.2f} vs ToMe {v['ToMe']:.2f}, EViT {v['EViT']:.2f} -> "
              f"{'holds' if v['PM_at_least_as_accurate'] else 'does NOT hold'} "
              f"(PM - best peer = {v['PM_minus_best_peer_images']:+d} of {len(data.test)} test images)")
    print(f"wrote {out} and {png}; total {timings['total_s']:.1f} s")
    if work_ctx:
        work_ctx.cleanup()
    return result


if __name__ == "__main__":
    main()
