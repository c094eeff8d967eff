"""Accuracy side-by-side on the digits task (issue 6): Prune-and-Merge vs ToMe vs EViT at matched GMACs.

1. The digits demo (``pm_kernels.pipeline.demo.run_demo``, its defaults, fixed seed) runs once, into a
   scratch folder: it trains the dense digits ViT, calibrates, compresses at each keep rate (0.6, 0.4) and
   fine-tunes PM with distillation from the dense model. Its checkpoints (``dense.pth``,
   ``pm_keep*.pth``) are loaded back: the PM rows are the demo's own models.
2. For each keep rate, ToMe (``bench/peers/tome.py``, per-block r schedule from ``match_tome_r``) and EViT
   (``bench/peers/evit.py``, one keep rate at blocks 1, 2, 3 of the 4-block ViT, i.e. the paper's
   "quarters of the depth" ``default_locations(4)``, from ``match_evit_keep_rate``) are set to the PM
   model's analytic GMACs, built on the same dense weights (a plain timm ``VisionTransformer``), and
   fine-tuned with the PM run's exact ``TrainConfig`` (read back from its checkpoint: same epochs, lr,
   batch, seed, distillation α and T) from the same dense teacher.
3. Every row is evaluated on the held-out split: top-1, GMACs (analytic, ``bench/peers/flops.py``,
   1 MAC = 1 FLOP, overheads included: PM's merge / reconstruct, ToMe's matching, EViT's fusion; the
   FlopCounterMode count / 2 is kept in the JSON as a cross-check) and CPU images/s (same thread count and
   batch for all; every model timed once per round, rounds interleaved, median over rounds).
   The dense row is the plain timm ViT with the dense weights (the PM-identity copy computes the same
   function but pays for M = R = I products).

    python bench/peers_digits.py --out bench/results/peers_digits_CPU.json

Writes the JSON and the same path with ``.png`` (top-1 vs GMACs, dense marked).
"""
import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import sklearn
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.peers import (default_locations, dense_flops, dims_from_model, evit_flops,  # noqa: E402
                         match_evit_keep_rate, match_tome_r, patch_evit, patch_tome, pm_flops, tome_flops)
from bench.compare import _versions  # noqa: E402
from bench.peers.flops import pm_token_counts  # noqa: E402
from pm_kernels.pipeline.data import load_data, make_loader  # noqa: E402
from pm_kernels.pipeline.demo import DemoConfig, run_demo  # noqa: E402
from pm_kernels.pipeline.evaluate import accuracy, gflops, throughput  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, train  # noqa: E402
from pm_kernels.pipeline.model import load_model  # noqa: E402

INPUT = (1, 32, 32)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plain_vit(pm_dense: torch.nn.Module, kwargs: dict) -> torch.nn.Module:
    """A plain timm ``VisionTransformer`` with the weights of the dense (identity-structure) PM model."""
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(**kwargs)
    sd = {k: v for k, v in pm_dense.state_dict().items() if k.rsplit(".", 1)[-1] not in ("M", "R", "keep_mask")}
    vit.load_state_dict(sd, strict=True)
    return vit.eval()


def interleaved_speed(models, batch: int, rounds: int, min_time: float, in_shape=INPUT, warmup: int = 3):
    """images/s per model: each round times every model once (no-grad forwards of ``in_shape`` images for
    ``min_time`` s; ``warmup`` forwards in the first round)."""
    runs = [[] for _ in models]
    for rnd in range(rounds):
        for i, m in enumerate(models):
            runs[i].append(throughput(m, in_shape, batch, "cpu", warmup=warmup if rnd == 0 else 1, repeats=1,
                                      min_time=min_time))
    return runs


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
    ax.set_title(f"digits ViT (4 blocks, 65 tokens), {result['n_test']} test images, seed {result['config']['seed']}:"
                 f"\nall fine-tuned {result['config']['ft_epochs']:g} epochs with distillation from the same dense "
                 f"model\n[CPU] {env['cpu_name']}, {env['threads']} thread(s), load average "
                 f"{env['loadavg_start'][0]:.1f} on {env['cpu_count']} cores (shared)", fontsize=7)
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
    cfg = DemoConfig()
    if args.quick:
        from pm_kernels.pipeline.demo import QUICK
        cfg = DemoConfig(**QUICK)
    if args.seed is not None:
        cfg.seed = args.seed
    loadavg_start = list(os.getloadavg())

    work_ctx = tempfile.TemporaryDirectory(prefix="peers_digits_") if args.work is None else None
    work = work_ctx.name if work_ctx else args.work
    os.makedirs(work, exist_ok=True)
    timings = {}

    # 1. the demo: dense training, calibration, PM compression + distillation fine-tuning
    t = time.perf_counter()
    demo = run_demo(work, cfg, device="cpu", progress=False, log=lambda m: print(f"[demo] {m}", flush=True))
    timings["demo_s"] = time.perf_counter() - t

    dense_pm, meta = load_model(os.path.join(work, "dense.pth"))
    kwargs = meta["model_kwargs"]
    dense = plain_vit(dense_pm, kwargs)
    d = dims_from_model(dense)
    data = load_data("digits", seed=cfg.seed)
    test_loader = make_loader(data.test, 256, train=False)
    locs = default_locations(d.depth) if args.evit_locations is None else \
        [int(s) for s in args.evit_locations.split(",") if s]

    rows, models = [], []

    def add(method, keep, model, gmacs, setting, extra=None):
        row = {"method": method, "keep_rate": keep, "gmacs": gmacs, "setting": setting,
               "top1": accuracy(model, test_loader, "cpu"), "gmacs_flopcounter": gflops(model, INPUT, "cpu") / 2}
        row.update(extra or {})
        rows.append(row)
        models.append(model)
        print(f"{method} keep={keep}: top-1 {row['top1']:.2f}, GMACs {gmacs:.5f}", flush=True)
        return row

    add("dense", None, dense, dense_flops(d), "plain timm ViT",
        {"top1_pm_identity_copy": accuracy(dense_pm, test_loader, "cpu")})

    demo_rows = {r["model"]: r for r in demo["rows"]}
    for keep in cfg.keep_rates:
        pm, pm_meta = load_model(os.path.join(work, f"pm_keep{keep:g}.pth"))
        pm.eval()
        ft_cfg = TrainConfig(**pm_meta["train"]["config"])
        target = pm_flops(pm)
        ks = pm_token_counts(pm)
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
    runs = interleaved_speed(models, cfg.batch_size, args.rounds, args.min_time)
    timings["speed_s"] = time.perf_counter() - t
    dense_row = rows[0]
    for row, rr in zip(rows, runs):
        row["images_per_s_runs"] = rr
        row["images_per_s"] = statistics.median(rr)
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
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": {"device_type": "cpu", "cpu_name": cpu_name(), "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(), "loadavg_start": loadavg_start,
                "loadavg_end": list(os.getloadavg()), "versions": dict(_versions(), sklearn=sklearn.__version__)},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "finetune_config": ft_cfg.__dict__ if cfg.keep_rates else None,
        "evit_locations": locs,
        "gmacs_counter": "analytic, bench/peers/flops.py (1 MAC = 1 FLOP; PM merge/reconstruct, ToMe matching, "
                         "EViT fusion included); gmacs_flopcounter = FlopCounterMode FLOPs / 2 (cross-check)",
        "speed": {"batch": cfg.batch_size, "rounds": args.rounds, "min_time_s": args.min_time,
                  "how": "no-grad forwards of a random batch; each round times every model once; median"},
        "n_train": len(data.train), "n_test": len(data.test),
        "rows": rows, "table": table, "target_PM_at_least_as_accurate": target, "timings": timings,
    }
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
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
