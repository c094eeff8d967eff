"""Segmentation speed on the CPU (issue 12): ViT-S/16 at 512×512 (N = 1025), dense vs Prune-and-Merge, eager fp32.

Same mode against same mode: eager, fp32, no_grad, the same batch (1 and 4), threads and device, in one run with
the models interleaved (``pm_kernels.measure.time_interleaved``; the median over rounds is reported). Next to each
speed-up, its ceiling: the MAC ratio (``pm_kernels.measure.traced_macs`` on the very modules timed).

- backbone: timm ``vit_small_patch16_384`` built at 512² (random weights: speed does not depend on them),
  ``forward_features`` (all N tokens); PM: the same weights compressed with the SPEC §8 per-layer structure at
  each keep rate (every block keeps int(keep · 1024) centres + CLS, no pruning; seeded random scores: with
  per-layer thresholds the token counts, hence the cost, do not depend on the scores) and run through
  ``pm_kernels.optimize`` (``OptimizedPM.forward_features``: folded boundaries, all N tokens at the exit).
- whole model: ``pm_kernels.Segmenter`` with the mask decoder (2 layers) and 150 classes (ADE20K), logits
  upsampled to 512², dense vs ``optimize(segmenter)``.
- structure build: ``build_merge_matrix`` + ``init_reconstruct`` for one layer at N = 1601 (640², patch 16).

The CPU is shared: the load average at start and end is recorded; re-run at a quiet moment with

    python bench/seg_speed.py --out bench/results/seg_speed_CPU.json
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pm_kernels  # noqa: E402
from pm_kernels.measure import environment, finish_environment, forward, time_interleaved, traced_macs  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402


def structure_build_ms(repeats: int = 3):
    from pm_kernels.structure import build_merge_matrix, init_reconstruct, search_structure
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 1600, generator=g) + 0.01
    out = {}
    for keep in (0.8, 0.7, 0.5):
        st = search_structure(scores, keep_rate=keep, thresholds="per_layer")[0]
        b, r = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            M = build_merge_matrix(scores[0], st.pruned, st.centres, (40, 40))
            t1 = time.perf_counter()
            init_reconstruct(M)
            b.append(1e3 * (t1 - t))
            r.append(1e3 * (time.perf_counter() - t1))
        out[f"keep {keep:g}"] = {"K": M.shape[0], "N": M.shape[1], "build_merge_matrix_ms": statistics.median(b),
                                 "init_reconstruct_ms": statistics.median(r)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_384")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.8, 0.7, 0.5])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timed run (at least one call)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(_ROOT, "bench", "results", "seg_speed_CPU.json"))
    args = p.parse_args(argv)

    import timm
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment("cpu")
    t0 = time.perf_counter()
    dense_bb = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval()
    dense_seg = pm_kernels.Segmenter(dense_bb, args.classes, "mask").eval()
    L, P = len(dense_bb.blocks), dense_bb.patch_embed.num_patches
    scores = torch.rand(L, P, generator=torch.Generator().manual_seed(1)) + 0.01
    models = {"dense": (dense_bb.forward_features, dense_seg)}
    info = {}
    for keep in args.keep_rates:
        seg = copy.deepcopy(dense_seg)
        pm_kernels.compress(seg, scores, keep_rate=keep, thresholds="per_layer")
        fast = pm_kernels.optimize(seg)
        models[f"PM keep {keep:g}"] = (fast.features.forward_features, fast)
        info[f"PM keep {keep:g}"] = {"K_per_block": [b.num_kept(P + 1) for b in seg.backbone.blocks]}
    setup_s = time.perf_counter() - t0

    x1 = torch.randn(1, 3, args.img_size, args.img_size)
    mac = {name: {"backbone": traced_macs(bb, x1) / 1e9, "whole": traced_macs(whole, x1) / 1e9}
           for name, (bb, whole) in models.items()}
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        cases = {(name, part): forward(fn, x) for name, fns in models.items()
                 for part, fn in zip(("backbone", "whole"), fns)}
        rates = time_interleaved(cases, items=batch, rounds=args.rounds, min_time=args.min_time, warmup=1,
                                 log=lambda line: print(f"batch {batch} {line.split(':')[0]} done "
                                                        f"(load {os.getloadavg()[0]:.1f})", flush=True))
        for part in ("backbone", "whole"):
            dense_ips = rates[("dense", part)].median
            for name in models:
                r = rates[(name, part)]
                ratio = mac["dense"][part] / mac[name][part]
                rows.append({"batch": batch, "part": part, "model": name, "gmacs_per_image": mac[name][part],
                             **r.to_dict(), "speedup": r.median / dense_ips, "mac_ratio": ratio,
                             "speedup_over_mac_ratio": (r.median / dense_ips) / ratio})
    build = structure_build_ms()
    lines = [f"{'batch':>5} {'part':<8} {'model':<12} {'GMACs':>7} {'img/s':>7} {'speed-up':>8} {'MAC ratio':>9} "
             f"{'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['part']:<8} {r['model']:<12} {r['gmacs_per_image']:>7.2f} "
                     f"{r['images_per_s']:>7.3f} {r['speedup']:>7.2f}x {r['mac_ratio']:>8.2f}x "
                     f"{r['speedup_over_mac_ratio']:>6.2f}")
    table = "\n".join(lines)
    print(table)
    for k, v in build.items():
        print(f"structure at N = {v['N']}, {k} (K = {v['K']}): build_merge_matrix {v['build_merge_matrix_ms']:.1f} ms"
              f" + init_reconstruct {v['init_reconstruct_ms']:.1f} ms")
    result = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + list(
            sys.argv[1:] if argv is None else argv)),
        "env": finish_environment(env),
        "setup": {"model": args.model, "img_size": args.img_size, "tokens": P + 1, "classes": args.classes,
                  "decoder": "mask (2 layers)", "mode": "eager fp32, torch.no_grad", "rounds": args.rounds,
                  "min_time_s": args.min_time, "structures": info, "setup_s": setup_s},
        "rows": rows, "table": table, "structure_build_N1601": build,
    }
    out = save_json(result, os.path.abspath(args.out))
    print(f"wrote {out} (load average {env['load_average_start'][0]:.1f} at start, "
          f"{env['load_average_end'][0]:.1f} at end, {os.cpu_count()} cores)")
    return result


if __name__ == "__main__":
    main()
