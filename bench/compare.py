"""Side-by-side benchmark (issue 6): dense timm DeiT (SDPA) vs ToMe vs EViT vs Prune-and-Merge, in PyTorch.

For each model, images/s (``pm_kernels.measure.time_interleaved``: every variant built and warmed up, then timed
in interleaved rounds, ``--iters`` forwards per round, median and min-max over ``--repeats`` rounds), peak memory
(CUDA only) and GMACs (1 MAC = 1 FLOP, the literature's convention) of:

- ``dense``          timm DeiT, attention on ``F.scaled_dot_product_attention``;
- ``pm-torch``       PM (``pm_kernels.compress``), every op on the pure-PyTorch backend;
- ``pm-kernels``     the same PM model with ``backend="auto"`` (native / Triton kernels where available; not
                     timed when auto resolves to torch, e.g. on the CPU; ``--pm-kernels-backend cuda`` forces
                     the compiled extension's token ops, its C++ kernels on the CPU);
- ``pm-optimized``   ``pm_kernels.optimize`` of the PM model (boundaries folded; GMACs traced), backend auto;
- ``pm-compile``     the PM model (``--compile-backend``, default torch) under ``torch.compile`` (``--compile``);
- ``dense-compile``  the dense model under ``torch.compile`` (``--compile``), the fair reference for it;
- ``tome``           ToMe with a per-block r schedule matched to the PM model's GMACs;
- ``evit``           EViT (blocks 3, 6, 9) with the keep rate matched to the PM model's GMACs;

for every PM keep rate in ``--keep-rates`` (default 0.6, 0.4), with ratios against dense. GMACs: the library's
count of the PM structure (``measure.analytic_macs``), traced for the folded model (``measure.traced_macs``),
analytic for the peers (``bench/peers/flops.py``). Weights are random (speed and MACs do not depend on them); the
PM structure comes from random scores (``--scores random``) or scores calibrated on random images. Writes
``--out`` (JSON) and the same path with ``.png`` (throughput vs GMACs). ONNX Runtime: ``bench/compare_ort.py``.

    python bench/compare.py --device cuda --batch 256 --dtype bf16 --models deit_tiny,deit_small,deit_base \\
        --compile --out bench/results/compare_h100_bf16.json
    python bench/compare.py --device cpu --batch 8 --dtype fp32 --models deit_tiny \\
        --out bench/results/compare_cpu_deit_tiny.json          # CPU mode: labelled CPU everywhere
    python bench/compare.py --replot bench/results/compare_cpu_deit_tiny.json   # redraw PNG, print table
"""
import argparse
import copy
import gc
import json
import os
import sys
import traceback

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pm_kernels  # noqa: E402
from bench.common import MODELS, pm_scores  # noqa: E402
from bench.peers import (default_locations, dense_flops, dims_from_model, match_evit_keep_rate,  # noqa: E402
                         match_tome_r, patch_evit, patch_tome)
from pm_kernels.measure import (analytic_macs, environment, finish_environment, forward, kept_tokens,  # noqa: E402
                                time_interleaved, traced_macs)
from pm_kernels.pipeline.io import save_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_memory(model, x, device):
    """(peak_mem_mib, activ_mem_mib, output) of one forward (after the warm-up): peak = this model's weights +
    input + ``max_memory_allocated`` above what was allocated before the forward (activ); CUDA only (None on the
    CPU)."""
    with torch.no_grad():
        out = model(x)
        if device.type != "cuda":
            return None, None, out
        torch.cuda.synchronize(device)
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = model(x)
        torch.cuda.synchronize(device)
        activ = torch.cuda.max_memory_allocated(device) - before
    return (weights + x.numel() * x.element_size() + activ) / 2 ** 20, activ / 2 ** 20, out


def _resolved_backend(device, dtype) -> str:
    from pm_kernels.dispatch import select
    return select("reconstruct_merge", "auto", device, dtype)


def bench_model(name, args, device, dtype):
    """Rows of one model: every variant built and warmed up (kept resident), then timed interleaved."""
    import timm
    timm_name = MODELS.get(name, name)
    torch.manual_seed(args.seed)
    dense = timm.create_model(timm_name, pretrained=False).eval()
    d = dims_from_model(dense)
    x = torch.randn(args.batch, 3, *dense.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype)
    rows, notes, live = [], [], {}

    def run(method, keep, build, gmacs, extra=None, compile_model=False):
        row = {"model": name, "timm_name": timm_name, "method": method, "keep_rate": keep, "gflops": gmacs,
               **(extra or {})}
        print(f"[{name}] {method:14s} keep={keep} GMACs={gmacs:.3f}: build + warm-up", flush=True)
        try:
            model = build().to(device=device, dtype=dtype).eval()
            if compile_model:
                model = torch.compile(model, mode=args.compile_mode)
            with torch.no_grad():
                for _ in range(max(args.warmup, 3) if compile_model else args.warmup):
                    model(x)
            row["peak_mem_mib"], row["activation_mem_mib"], out = peak_memory(model, x, device)
            row["output_finite"] = bool(torch.isfinite(out.float()).all())
            live[f"{method}@{keep}"] = (row, model)
        except Exception as err:  # noqa: BLE001  (one variant failing must not lose the others' figures)
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        rows.append(row)
        return row

    run("dense", None, lambda: copy.deepcopy(dense), dense_flops(d))
    if args.compile:
        run("dense-compile", None, lambda: copy.deepcopy(dense), dense_flops(d), compile_model=True)
    scores = pm_scores(dense, args.scores, x.float(), args.calib_batches, args.seed)
    locs = default_locations(d.depth)
    for keep in args.keep_rates:
        pm_model = pm_kernels.compress(copy.deepcopy(dense), scores, keep_rate=keep, prune_rate=args.prune_rate)
        target = analytic_macs(pm_model) / 1e9
        pm_extra = {"K_per_layer": kept_tokens(pm_model), "prune_rate": args.prune_rate, "scores": args.scores}

        def pm_build(backend, pm_model=pm_model):
            m = copy.deepcopy(pm_model)
            pm_kernels.set_backend(m, "auto" if backend not in ("auto", "torch") else backend)
            if backend not in ("auto", "torch"):  # forced token-op backend; attention keeps "auto"
                for blk in m.blocks:
                    blk.backend = backend
            return m

        run("pm-torch", keep, lambda: pm_build("torch"), target, pm_extra)
        auto = _resolved_backend(device, dtype) if args.pm_kernels_backend == "auto" else args.pm_kernels_backend
        if auto == "torch":
            msg = (f"pm-kernels (keep {keep}) not timed: backend auto resolves to 'torch' on {device.type} (no "
                   "native/Triton kernel usable), i.e. the pm-torch row")
            notes.append(msg)
        else:
            run("pm-kernels", keep, lambda: pm_build(args.pm_kernels_backend), target, pm_extra)["pm_backend"] = auto
        # The inference fast path folds every block boundary: fewer MACs than the structure, so they are traced.
        optimized = lambda: pm_kernels.optimize(pm_build("auto"))  # noqa: E731
        gmacs = traced_macs(optimized().to(device, torch.float32), x[:1].float()) / 1e9
        run("pm-optimized", keep, optimized, gmacs, pm_extra)
        if args.compile:
            run("pm-compile", keep, lambda: pm_build(args.compile_backend), target,
                dict(pm_extra, compile_backend=args.compile_backend), compile_model=True)
        r, g_tome = match_tome_r(d, target)
        run("tome", keep, lambda r=r: patch_tome(copy.deepcopy(dense), r), g_tome,
            {"r_schedule": r, "target_gflops": target})
        k_evit, g_evit = match_evit_keep_rate(d, target, locs)
        run("evit", keep, lambda k=k_evit: patch_evit(copy.deepcopy(dense), k, locs), g_evit,
            {"evit_keep_rate": k_evit, "evit_locations": locs, "target_gflops": target})
        del pm_model

    rates = time_interleaved({key: forward(model, x) for key, (_, model) in live.items()}, items=args.batch,
                             rounds=args.repeats, calls=args.iters, warmup=0, device=device,
                             log=lambda line: print(f"[{name}] {line}", flush=True))
    for key, (row, _) in live.items():
        row.update(rates[key].to_dict())
    live.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = next((r for r in rows if r["method"] == "dense" and r.get("images_per_s")), None)
    for r in rows:
        r["gflops_vs_dense"] = r["gflops"] / dense_flops(d)
        if base and r.get("images_per_s"):
            r["speedup_vs_dense"] = r["images_per_s"] / base["images_per_s"]
        if base and r.get("peak_mem_mib") and base.get("peak_mem_mib"):
            r["mem_vs_dense"] = r["peak_mem_mib"] / base["peak_mem_mib"]
    return rows, notes


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = {"dense": "o", "dense-compile": "h", "pm-torch": "s", "pm-kernels": "D", "pm-optimized": "*",
               "pm-compile": "P", "tome": "^", "evit": "v"}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for mi, model in enumerate(models):
        for r in result["rows"]:
            if r["model"] != model or not r.get("images_per_s"):
                continue
            runs = r.get("images_per_s_runs") or [r["images_per_s"]]
            ips = r["images_per_s"]
            ax.errorbar(r["gflops"], ips, yerr=[[ips - min(runs)], [max(runs) - ips]], fmt=markers.get(r["method"], "x"),
                        color=colors[mi % len(colors)], ms=7, capsize=3, elinewidth=0.8)
            label = r["method"] + (f"@{r['keep_rate']}" if r["keep_rate"] is not None else "")
            ax.annotate(label, (r["gflops"], ips), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GMACs / image (1 MAC = 1 FLOP)")
    ax.set_ylabel("images / s (median)")
    env = result["env"]
    cpu = env.get("device_type", env.get("device")) == "cpu"
    title = (f"[{'CPU' if cpu else 'GPU'}] {env['device_name']}\nbatch {env['batch']}, {env['dtype']}, "
             f"torch {env['versions']['torch']}, models: {', '.join(models)}; marker = median, bars = min-max of "
             f"{env['repeats']} runs")
    load = env.get("loadavg_start", env.get("load_average_start"))
    if cpu and load:
        title += (f"\nshared CPU: load average {load[0]:.1f} on {env.get('cpu_count')} cores "
                  f"({env.get('cpu_threads', env.get('threads'))} torch threads): ratios are unreliable")
    ax.set_title(title, fontsize=7)
    for mi, model in enumerate(models):
        ax.scatter([], [], color=colors[mi % len(colors)], label=model)
    present = {r["method"] for r in result["rows"] if r.get("images_per_s")}
    for m, mk in markers.items():
        if m in present:
            ax.scatter([], [], marker=mk, color="gray", label=m)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=None, help="comma list of deit_tiny, deit_small, deit_base or timm names "
                                                  "(default: all three on cuda, deit_tiny on cpu)")
    p.add_argument("--keep-rates", default="0.6,0.4", help="PM keep rates; ToMe/EViT are matched to each")
    p.add_argument("--prune-rate", type=float, default=0.1)
    p.add_argument("--scores", default="random", choices=["random", "calibrated"])
    p.add_argument("--calib-batches", type=int, default=2, help="batches for --scores calibrated")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on cuda, 2 on cpu")
    p.add_argument("--iters", type=int, default=None, help="forwards per timed round (default: 20 cuda, 3 cpu)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds; median reported")
    p.add_argument("--pm-kernels-backend", default="auto", choices=["auto", "cuda", "triton"],
                   help="backend of the pm-kernels row (cuda = the compiled extension, also its C++ CPU kernels)")
    p.add_argument("--compile", action="store_true", help="also time dense and PM under torch.compile")
    p.add_argument("--compile-backend", default="torch", help="PM backend used under torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="no measurement: redraw the PNG and print the table of an existing result JSON")
    p.add_argument("--out", default=None, help="JSON path (PNG next to it); default bench/results/...")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (256 if cuda else 8)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.models = [m for m in (args.models or ("deit_tiny,deit_small,deit_base" if cuda else "deit_tiny")).split(",")
                   if m]
    args.keep_rates = [float(k) for k in args.keep_rates.split(",") if k]
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters or (20 if cuda else 3)
    if args.out is None:
        args.out = os.path.join(_ROOT, "bench", "results",
                                f"compare_{args.device}_{args.dtype}_b{args.batch}_{'_'.join(args.models)}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        png = os.path.splitext(args.replot)[0] + ".png"
        plot(result, png)
        print_table(result)
        print(f"redrew {png}")
        return result
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu for the CPU mode)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device, batch=args.batch, dtype=args.dtype, warmup=args.warmup, iters=args.iters,
                      repeats=args.repeats, compile=args.compile, compile_mode=args.compile_mode,
                      label="CPU" if device.type == "cpu" else "GPU", device_type=device.type,
                      flops_convention="1 MAC = 1 FLOP (fvcore / DeiT / ToMe / EViT / PM papers); PM: "
                                       "pm_kernels.measure (structure analytic, optimize traced), peers analytic "
                                       "(bench/peers/flops.py: ToMe's bipartite similarity, EViT's fusion included)",
                      timing="pm_kernels.measure.time_interleaved: every variant built and warmed up, then timed in "
                             "interleaved rounds (order reversed every other round), `iters` forwards each, "
                             "device-synchronised; images/s = median over rounds",
                      weights="random init (pretrained=False); no accuracy column")
    if args.pm_kernels_backend != "auto":
        env["pm_kernels_backend"] = args.pm_kernels_backend
    result = {"env": env, "rows": [], "notes": []}
    for name in args.models:
        rows, notes = bench_model(name, args, device, DTYPES[args.dtype])
        result["rows"] += rows
        result["notes"] += [f"{name}: {n}" for n in notes]
    finish_environment(env)
    save_json(result, args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    print_table(result)
    print(f"wrote {args.out} and {png}")
    return result


def print_table(result):
    env = result["env"]
    print(f"\n[{env['label']}] {env['device_name']}  batch {env['batch']}  {env['dtype']}")
    print(f"{'model':12s} {'method':14s} {'keep':>5s} {'GMACs':>8s} {'xMACs':>7s} {'img/s':>10s} "
          f"{'speedup':>8s} {'peakMiB':>8s}  runs min-max")
    for r in result["rows"]:
        ips = r.get("images_per_s")
        runs = r.get("images_per_s_runs")
        print(f"{r['model']:12s} {r['method']:14s} {str(r['keep_rate'] or '-'):>5s} {r['gflops']:8.3f} "
              f"{r['gflops_vs_dense']:7.3f} {('%.1f' % ips) if ips else 'ERROR':>10s} "
              f"{('%.3f' % r['speedup_vs_dense']) if r.get('speedup_vs_dense') else '-':>8s} "
              f"{('%.0f' % r['peak_mem_mib']) if r.get('peak_mem_mib') else '-':>8s}  "
              + (f"{min(runs):.1f}-{max(runs):.1f}" if runs else ""))
    for n in result["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
