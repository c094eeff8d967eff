"""SAM's image encoder on the CPU (issue 26): ViT-B at 1024² (4096 tokens, 12 blocks: windows of 14 padded to a
70×70 grid, global attention in blocks 2, 5, 8, 11), dense vs Prune-and-Merge ``optimize``, eager fp32, batch 1.

- dense: timm ``samvit_base_patch16`` built without weights (random: speed does not depend on them), unpatched,
  ``forward_features`` (the neck's output).
- PM: the same weights, patched, calibrated on one random image (SPEC §3 per window, a loss on the neck's
  output: the structure's K per layer comes from the SPEC §4 global search, then per window,
  docs/windowed_attention.md §3), compressed at each keep rate and folded by ``pm_kernels.optimize``
  (``OptimizedSAM.forward_features``).
- one run, the models interleaved: each round times one forward of every model; the median over rounds is reported.
  MACs from the library's counter (``pm_kernels.budget.pm_macs``: the PM model, boundaries unfolded) and, as a
  cross-check, FlopCounterMode on the very modules timed (the folded form does fewer: its boundaries are folded).

The CPU is shared: the load average at start and end is recorded.

    python bench/sam_speed.py --out bench/results/sam_speed_CPU.json
"""
import argparse
import copy
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pm_kernels  # noqa: E402
from pm_kernels.measure import environment, finish_environment, forward, pm_macs, time_interleaved  # noqa: E402
from pm_kernels.measure import traced_macs  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="samvit_base_patch16")
    p.add_argument("--img-size", type=int, default=1024, help="image side (1024: SAM's)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(_ROOT, "bench", "results", "sam_speed_CPU.json"))
    args = p.parse_args(argv)

    import timm
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment("cpu")
    t0 = time.perf_counter()
    dense = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    pm = pm_kernels.patch(copy.deepcopy(dense))
    grid = tuple(dense.patch_embed.grid_size)
    size = (grid[0] * dense.patch_embed.patch_size[0], grid[1] * dense.patch_embed.patch_size[1])
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    t_cal = time.perf_counter()
    scores = pm_kernels.calibrate(pm, [(x, None)], lambda out, _: out.float().square().mean())
    calibrate_s = time.perf_counter() - t_cal
    n = grid[0] * grid[1]
    dense_macs = pm_macs(pm, [n] * len(pm.blocks)) / 1e9
    models = {"dense": dense.forward_features}
    info = {"dense": {"gmacs": dense_macs, "traced_gmacs": traced_macs(dense.forward_features, x) / 1e9}}
    for keep in args.keep_rates:
        model = copy.deepcopy(pm)
        pm_kernels.compress(model, scores, keep_rate=keep)
        fast = pm_kernels.optimize(model)
        name = f"PM keep {keep:g}"
        models[name] = fast.forward_features
        kept = [b.num_kept(n) for b in model.blocks]
        info[name] = {"gmacs": pm_macs(model, kept) / 1e9, "traced_gmacs": traced_macs(fast.forward_features, x) / 1e9,
                      "kept_tokens_per_block": kept,
                      "K_per_window": [None if b.M is None else b.M.shape[1] for b in model.blocks],
                      "empty_slots_per_block": [int((b.centre_slot < 0).sum()) for b in model.blocks],
                      "pruned_per_block": [b.num_pruned for b in model.blocks]}
        with torch.no_grad():  # the folded form is the PM model
            err = (fast.forward_features(x) - model.forward_features(x)).abs().max().item()
        info[name]["max_abs_diff_optimize_vs_pm_model"] = err
    setup_s = time.perf_counter() - t0

    # one forward per case per round (a forward is seconds), the order reversed on odd rounds
    rates = time_interleaved({name: forward(fn, x) for name, fn in models.items()}, rounds=args.rounds, calls=1,
                             warmup=1, log=lambda line: print(f"{line} (load {os.getloadavg()[0]:.1f})", flush=True))
    rows = []
    dense_s = 1.0 / rates["dense"].median
    for name in models:
        s = 1.0 / rates[name].median
        ratio = dense_macs / info[name]["gmacs"]
        rows.append({"model": name, "gmacs": info[name]["gmacs"], "traced_gmacs": info[name]["traced_gmacs"],
                     "seconds_median": s, **rates[name].to_dict(), "speedup": dense_s / s, "mac_ratio": ratio,
                     "speedup_over_mac_ratio": dense_s / s / ratio})
    lines = [f"{'model':<12} {'GMACs':>7} {'traced':>7} {'s/img':>7} {'speed-up':>8} {'MAC ratio':>9} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['gmacs']:>7.1f} {r['traced_gmacs']:>7.1f} {r['seconds_median']:>7.2f} "
                     f"{r['speedup']:>7.2f}x {r['mac_ratio']:>8.2f}x {r['speedup_over_mac_ratio']:>6.2f}")
    table = "\n".join(lines)
    print(table)
    result = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + list(
            sys.argv[1:] if argv is None else argv)),
        "env": finish_environment(env),
        "setup": {"model": args.model, "weights": "random (timm, pretrained=False)", "image": list(size),
                  "tokens": n, "mode": "eager fp32, torch.no_grad, batch 1, forward_features (neck output)",
                  "calibration": "1 random image, loss mean(neck output²)", "calibrate_s": calibrate_s,
                  "setup_s": setup_s, "rounds": args.rounds, "structures": info},
        "rows": rows,
        "table": table,
    }
    save_json(result, os.path.abspath(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
