"""Quick start: patch a DeiT, calibrate it on random data, compress it, print tokens per layer, then MACs and
images/s of the dense model against the deployable PM model (``pm_kernels.optimize``), timed interleaved.

    python python/quickstart.py --model deit_small_patch16_224 --keep-rate 0.6 --batch 8 [--out quickstart.json]

Random weights and random data: this shows the mechanics and the speed, not accuracy (the digits pipeline,
``pm-kernels demo``, shows accuracy on real data). Speed: both models in the same interleaved rounds
(``pm_kernels.measure``), the median and the spread (min-max) over the rounds, the speed-up next to the MAC ratio
(its ceiling); a busy machine widens the spread, it does not favour either model.
"""
import argparse
import copy

import timm
import torch

import pm_kernels
from pm_kernels.measure import environment, finish_environment, forward, free_cores, time_interleaved, traced_macs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.6)
    parser.add_argument("--prune-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median, min-max)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per model per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the free cores, at least 1)")
    parser.add_argument("--out", help="also write the figures, with the environment, to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or free_cores())
    env = environment(args.device)
    dense = timm.create_model(args.model).eval().to(args.device)
    size = dense.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=args.device)
    batches = [(torch.randn(args.batch, 3, *size, device=args.device),
                torch.randint(0, dense.num_classes, (args.batch,), device=args.device))
               for _ in range(args.calib_batches)]

    pm = pm_kernels.patch_timm(copy.deepcopy(dense))
    scores = pm_kernels.calibrate(pm, batches)
    pm_kernels.compress(pm, scores, keep_rate=args.keep_rate, prune_rate=args.prune_rate)

    n = pm.num_prefix_tokens + pm.patch_embed.num_patches
    print(f"{args.model}: N = {n} tokens, keep_rate = {args.keep_rate}, prune_rate = {args.prune_rate}")
    print("layer  kept K  pruned  merged")
    for layer, blk in enumerate(pm.blocks):
        k, pruned = blk.num_kept(n), blk.num_pruned
        print(f"{layer:5d}  {k:6d}  {pruned:6d}  {n - k - pruned:6d}")
    mean_k = sum(b.num_kept(n) for b in pm.blocks) / len(pm.blocks)
    print(f"mean K = {mean_k:.1f} ({mean_k / n:.3f} of N)")

    models = {"dense (timm, SDPA)": dense, "PM, optimize": pm_kernels.optimize(pm.eval())}
    macs = {name: traced_macs(m, images[:1]) for name, m in models.items()}
    rates = time_interleaved({name: forward(m, images) for name, m in models.items()}, items=args.batch,
                             rounds=args.rounds, min_time=args.min_time, device=args.device)
    finish_environment(env)
    dense_name = next(iter(models))
    print(f"\nfp32 inference, batch {args.batch}, {env['device_name']} (torch {torch.__version__}, "
          f"{env['threads']} thread{'s' if env['threads'] > 1 else ''}), {args.rounds} interleaved rounds, images/s "
          "median (min-max):")
    rows = []
    for name in models:
        speedup = rates[name].median / rates[dense_name].median
        cpu_speedup = rates[name].cpu_median / rates[dense_name].cpu_median
        ratio = macs[dense_name] / macs[name]
        lo, hi = rates[name].spread
        print(f"  {name:20s} {macs[name] / 1e9:6.3f} GMACs/image  {rates[name].median:8.2f} images/s "
              f"({lo:.2f}-{hi:.2f})   speed-up {speedup:.2f}x (by CPU time {cpu_speedup:.2f}x), "
              f"MAC ratio {ratio:.2f}x")
        rows.append({"model": name, "gmacs": macs[name] / 1e9, **rates[name].to_dict(), "speedup": speedup,
                     "cpu_speedup": cpu_speedup, "mac_ratio": ratio})
    load = env.get("load_average_start"), env.get("load_average_end")
    if all(load):
        print(f"load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end"
              + ("; other work shared the cores: the spread shows how much" if env.get("under_load") else ""))
    if args.out:
        from pm_kernels.pipeline.io import save_json
        save_json({"args": vars(args), "environment": env, "K": [b.num_kept(n) for b in pm.blocks], "N": n,
                   "rows": rows}, args.out)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
