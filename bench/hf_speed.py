"""HuggingFace transformers ViT: ``pm_kernels.optimize`` of a compressed model vs the dense model (issue 22 §5).

An HF ``ViTForImageClassification`` with a ViT-S/16 config (width 384, 12 layers, 6 heads, 224 px, random
weights: speed and MACs do not depend on them), dense with transformers' SDPA attention, against its PM copies
compressed at each ``--keep-rates`` on random scores (SPEC §4 search, prune rate 0.1) and folded by
``pm_kernels.optimize`` (same call, same ``ImageClassifierOutput``). CPU, fp32, ``torch.inference_mode``.

Timing: every model is built and warmed up first; then, per batch size, the models are timed interleaved
(``pm_kernels.measure.time_interleaved``: ``--repeats`` rounds, ``--iters`` forwards each per round); images/s =
median over rounds, with the spread. MACs: ``pm_kernels.measure.analytic_macs`` (1 MAC = 1 FLOP). Reported per
keep rate and batch: the speed-up
over dense, the MAC ratio (dense MACs / PM MACs: the speed-up the MAC count promises) and their quotient (the
issue's target: ≥ 0.95 at batch 8). The machine's load average is recorded before and after: on a shared CPU it
is part of the result.

    python bench/hf_speed.py --out bench/results/hf_vit_small_CPU.json
"""
import argparse
import copy
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pm_kernels.measure import analytic_macs, environment, finish_environment, forward, time_interleaved  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402

VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                 image_size=224, patch_size=16, num_labels=1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep-rates", default="0.6,0.4")
    p.add_argument("--batches", default="8,1")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per batch size (median reported)")
    p.add_argument("--iters", default="2,10", help="forwards per timed run, one per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_ROOT, "bench", "results", "hf_vit_small_CPU.json"))
    args = p.parse_args(argv)
    args.keep_rates = [float(k) for k in args.keep_rates.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.iters = [int(i) for i in args.iters.split(",")]
    if len(args.iters) != len(args.batches):
        p.error(f"--iters: expected one count per batch size ({len(args.batches)}), got {len(args.iters)}")
    return args


def build(args):
    """[(name, keep rate, model, MACs per image)]: the dense model, then one optimize form per keep rate."""
    import transformers
    import pm_kernels

    torch.manual_seed(args.seed)
    dense = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT_SMALL)).eval()
    assert dense.config._attn_implementation == "sdpa", dense.config._attn_implementation
    n_layers, n_patches = VIT_SMALL["num_hidden_layers"], (224 // 16) ** 2
    models = [("dense (HF, SDPA)", None, dense, analytic_macs(dense))]
    g = torch.Generator().manual_seed(args.seed)
    for keep in args.keep_rates:
        pm = pm_kernels.compress(copy.deepcopy(dense), torch.rand(n_layers, n_patches, generator=g) + 1e-3,
                                 keep_rate=keep, prune_rate=0.1)
        models.append((f"PM optimize keep {keep:g}", keep, pm_kernels.optimize(pm), analytic_macs(pm)))
    return models


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    env = environment("cpu", dtype="fp32", transformers=transformers.__version__,
                      model="transformers ViTForImageClassification, ViT-S/16 config, random weights",
                      timing="pm_kernels.measure.time_interleaved: all models built and warmed up, then timed in "
                             "interleaved rounds (iters forwards each); images/s = median over rounds",
                      macs="pm_kernels.measure.analytic_macs (1 MAC = 1 FLOP)", repeats=args.repeats,
                      iters=dict(zip(args.batches, args.iters)), warmup=args.warmup)
    models = build(args)
    rows = []
    for batch, iters in zip(args.batches, args.iters):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        rates = time_interleaved({name: forward(model, x) for name, _, model, _ in models}, items=batch,
                                 rounds=args.repeats, calls=iters, warmup=args.warmup,
                                 log=lambda line: print(f"batch {batch} {line}", flush=True))
        dense_name, dense_macs = models[0][0], models[0][3]
        for name, keep, _, macs in models:
            r = rates[name]
            row = {"model": name, "keep_rate": keep, "batch": batch, **r.to_dict(),
                   "images_per_s_min_max": list(r.spread), "gmacs": macs / 1e9}
            if keep is not None:
                row["speedup"] = r.median / rates[dense_name].median
                row["mac_ratio"] = dense_macs / macs  # the speed-up the MAC count promises
                row["speedup_over_mac_ratio"] = row["speedup"] / row["mac_ratio"]
            rows.append(row)
    result = {"env": finish_environment(env), "rows": rows}
    save_json(result, args.out)
    for r in rows:
        extra = "" if r["keep_rate"] is None else (f"  speed-up {r['speedup']:.3f}  MAC ratio {r['mac_ratio']:.3f}"
                                                   f"  speed-up / MAC ratio {r['speedup_over_mac_ratio']:.3f}")
        print(f"batch {r['batch']}  {r['model']:<22} {r['images_per_s']:8.2f} img/s  {r['gmacs']:.3f} GMACs{extra}")
    print(f"wrote {args.out} (load average {env['load_average_start'][0]:.1f} -> {env['load_average_end'][0]:.1f} "
          f"on {env['cpu_count']} cores)")
    return result


if __name__ == "__main__":
    main()
