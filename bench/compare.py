"""Side-by-side benchmark (issue 6): dense timm DeiT (SDPA) vs ToMe vs EViT vs Prune-and-Merge.

One command measures, for each model, inference throughput (images/s: every variant is built and warmed
up, then timed round-robin, ``--repeats`` × variant, ``--iters`` forwards each, device-synchronised; the
median over repeats is reported, min-max kept in the JSON and drawn as bars), peak memory (CUDA only) and
analytic GFLOPs (``bench/peers/flops.py``: 1 MAC = 1 FLOP, the literature's convention) of:

- ``dense``          timm DeiT, attention on ``F.scaled_dot_product_attention``;
- ``pm-torch``       PM (``pm_kernels.compress``), every op on the pure-PyTorch backend;
- ``pm-kernels``     the same PM model with ``backend="auto"`` (native / Triton kernels where available; not
                     timed when auto resolves to torch, e.g. on the CPU; ``--pm-kernels-backend cuda`` forces
                     the compiled extension's token ops, its C++ kernels on the CPU);
- ``pm-optimized``   ``pm_kernels.optimize`` of the PM model (boundaries folded; GFLOPs traced), backend auto;
- ``pm-compile``     the PM model (``--compile-backend``, default torch) under ``torch.compile`` (``--compile``);
- ``dense-compile``  the dense model under ``torch.compile`` (``--compile``), the fair reference for it;
- ``tome``           ToMe with a per-block r schedule matched to the PM model's GFLOPs;
- ``evit``           EViT (blocks 3, 6, 9) with the keep rate matched to the PM model's GFLOPs;

for every PM keep rate in ``--keep-rates`` (default 0.6, 0.4), with ratios against dense. Weights are random
(``pretrained=False``: speed and FLOPs do not depend on them); the PM structure comes from
``pm_kernels.search_structure`` on random scores (``--scores random``) or on scores calibrated on random
images (``--scores calibrated``). Writes ``--out`` (JSON) and the same path with ``.png`` (throughput vs
GFLOPs).

    python bench/compare.py --device cuda --batch 256 --dtype bf16 --models deit_tiny,deit_small,deit_base \\
        --compile --out bench/results/compare_h100_bf16.json
    python bench/compare.py --device cpu --batch 8 --dtype fp32 --models deit_tiny \\
        --out bench/results/compare_cpu_deit_tiny.json          # CPU mode: labelled CPU everywhere
    python bench/compare.py --replot bench/results/compare_cpu_deit_tiny.json   # redraw PNG, print table
    python bench/compare.py --runtime onnxruntime --models deit_small   # exported, in ONNX Runtime (CPU)
"""
import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.peers import (default_locations, dense_flops, dims_from_model, evit_flops,  # noqa: E402
                         match_evit_keep_rate, match_tome_r, patch_evit, patch_tome, pm_flops,
                         pm_flops_from_counts, tome_flops)
from bench.peers.flops import pm_token_counts  # noqa: E402

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
          "deit_base": "deit_base_patch16_224"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def _versions():
    import timm
    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        out["triton"] = f"not importable ({err})"
    try:
        import pm_kernels
        out["pm_kernels"] = getattr(pm_kernels, "__version__", "?")
        out["pm_kernels_backends"] = pm_kernels.backends()
    except Exception as err:  # noqa: BLE001
        out["pm_kernels"] = f"not importable ({err})"
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["git_commit"] = None
    return out


def prepare(model, x, device, warmup: int):
    """Warm up ``model`` and measure its memory over one forward: ``(peak_mem_mib, activ_mem_mib, out)``.

    peak = ``torch.cuda.max_memory_allocated`` during the forward minus what other resident models hold
    (this model's weights + input + activations); activ = the part above what was allocated before the
    forward. CUDA only (None on the CPU).
    """
    with torch.inference_mode():
        for _ in range(warmup):
            out = model(x)
        _sync(device)
        if device.type != "cuda":
            return None, None, out
        weights = sum(t.numel() * t.element_size() for t in
                      list(model.parameters()) + list(model.buffers()))
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = model(x)
        _sync(device)
        activ = torch.cuda.max_memory_allocated(device) - before
    return (weights + x.numel() * x.element_size() + activ) / 2 ** 20, activ / 2 ** 20, out


def time_once(model, x, device, iters: int) -> float:
    """images/s over ``iters`` forwards, device-synchronised."""
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return x.shape[0] * iters / (time.perf_counter() - t0)


def _pm_api():
    """pm_kernels' compress / set_backend / calibrate, or the reason they cannot be used."""
    try:
        import pm_kernels
        return {"compress": pm_kernels.compress, "set_backend": pm_kernels.set_backend,
                "optimize": pm_kernels.optimize,
                "calibrate": pm_kernels.calibrate, "patch_timm": pm_kernels.patch_timm}, None
    except Exception as err:  # noqa: BLE001
        return None, f"pm_kernels not importable: {type(err).__name__}: {err}"


def pm_scores(api, dense, mode: str, x, n_batches: int, seed: int):
    """(L, N−1) scores: random, or calibrated (SPEC §3) on random images / labels."""
    L, P = len(dense.blocks), dense.patch_embed.num_patches
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.rand(L, P, generator=g) + 1e-3
    model = api["patch_timm"](copy.deepcopy(dense).float().eval()).to(x.device)
    batches = [(torch.randn(x.shape[0], *x.shape[1:], generator=g).to(x.device),
                torch.randint(0, dense.num_classes, (x.shape[0],), generator=g).to(x.device))
               for _ in range(n_batches)]
    scores = api["calibrate"](model, batches)
    return scores.detach().float().cpu()


def traced_gmacs(model, x) -> float:
    """Multiply-accumulates (billions) of one image through ``model``, by FlopCounterMode (2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.to(x.device, torch.float32)(x[:1].float())
    return counter.get_total_flops() / 2e9


# --------------------------------------------------------------------------------------------- one model
def bench_model(name, args, device, dtype, api, api_error):
    import timm
    timm_name = MODELS.get(name, name)
    torch.manual_seed(args.seed)
    dense = timm.create_model(timm_name, pretrained=False).eval()
    d = dims_from_model(dense)
    x = torch.randn(args.batch, 3, *dense.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype)
    rows, notes, variants = [], [], []

    def run(method, keep, build, gflops, extra=None, compile_model=False):
        """Build and warm up one variant (kept resident); timing is interleaved afterwards."""
        row = {"model": name, "timm_name": timm_name, "method": method, "keep_rate": keep,
               "gflops": gflops, **(extra or {})}
        print(f"[{name}] {method:14s} keep={keep} GFLOPs={gflops:.3f}: build + warm-up", flush=True)
        try:
            model = build().to(device=device, dtype=dtype).eval()
            if compile_model:
                model = torch.compile(model, mode=args.compile_mode)
            warmup = max(args.warmup, 3) if compile_model else args.warmup
            row["peak_mem_mib"], row["activation_mem_mib"], out = prepare(model, x, device, warmup)
            row["output_finite"] = bool(torch.isfinite(out.float()).all())
            variants.append((row, model))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        rows.append(row)
        return row

    run("dense", None, lambda: copy.deepcopy(dense), dense_flops(d))
    if args.compile:
        run("dense-compile", None, lambda: copy.deepcopy(dense), dense_flops(d), compile_model=True)

    scores = None
    if api is not None:
        try:
            scores = pm_scores(api, dense, args.scores, x.float(), args.calib_batches, args.seed)
        except Exception as err:  # noqa: BLE001
            notes.append(f"PM scores failed: {type(err).__name__}: {err}")
            traceback.print_exc()
    else:
        notes.append(api_error)

    locs = default_locations(d.depth)
    for keep in args.keep_rates:
        pm_model, target_source = None, "pm_flops(compressed model)"
        if scores is not None:
            try:
                pm_model = api["compress"](copy.deepcopy(dense), scores, keep_rate=keep,
                                           prune_rate=args.prune_rate)
                target = pm_flops(pm_model)
            except Exception as err:  # noqa: BLE001
                notes.append(f"PM compress (keep {keep}) failed: {type(err).__name__}: {err}")
                traceback.print_exc()
                pm_model = None
        if pm_model is None:   # estimate: K = 1 + round(keep·(N−1)) in every block
            target_source = "estimate: K_l = 1 + round(keep·(N-1)) in every block (no PM model)"
            target = pm_flops_from_counts(d, [1 + round(keep * d.num_patches)] * d.depth)
        else:
            ks = pm_token_counts(pm_model)
            pm_extra = {"K_per_layer": ks, "prune_rate": args.prune_rate, "scores": args.scores}

            def pm_build(backend, pm_model=pm_model):
                m = copy.deepcopy(pm_model)
                if backend in ("auto", "torch"):
                    api["set_backend"](m, backend)
                else:   # forced token-op backend; attention keeps "auto" (it may lack that backend)
                    api["set_backend"](m, "auto")
                    for blk in m.blocks:
                        blk.backend = backend
                return m

            run("pm-torch", keep, lambda: pm_build("torch"), target, pm_extra)
            auto = (_resolved_backend(device, DTYPES[args.dtype]) if args.pm_kernels_backend == "auto"
                    else args.pm_kernels_backend)
            if auto == "torch":
                msg = (f"pm-kernels (keep {keep}) not timed: backend auto resolves to 'torch' on "
                       f"{device.type} (no native/Triton kernel usable), i.e. the pm-torch row")
                if msg not in notes:
                    notes.append(msg)
            else:
                row = run("pm-kernels", keep, lambda: pm_build(args.pm_kernels_backend), target, pm_extra)
                row["pm_backend"] = auto
            # The inference fast path: every block boundary folded into one small matmul (pm_kernels.optimize);
            # it does fewer MACs than the unfolded model, so its GFLOPs are counted by tracing, not estimated.
            optimized = lambda: api["optimize"](pm_build("auto"))  # noqa: E731
            run("pm-optimized", keep, optimized, traced_gmacs(optimized(), x), pm_extra)
            if args.compile:
                run("pm-compile", keep, lambda: pm_build(args.compile_backend), target,
                    dict(pm_extra, compile_backend=args.compile_backend), compile_model=True)

        r, g_tome = match_tome_r(d, target)
        run("tome", keep, lambda r=r: patch_tome(copy.deepcopy(dense), r), g_tome,
            {"r_schedule": r, "target_gflops": target, "target_source": target_source})
        k_evit, g_evit = match_evit_keep_rate(d, target, locs)
        run("evit", keep, lambda k=k_evit: patch_evit(copy.deepcopy(dense), k, locs), g_evit,
            {"evit_keep_rate": k_evit, "evit_locations": locs, "target_gflops": target,
             "target_source": target_source})
        del pm_model

    # interleaved timing: repeat r times every variant once, so load drift hits all variants alike
    for rep in range(args.repeats):
        for row, model in variants:
            if "error" in row:
                continue
            try:
                row.setdefault("images_per_s_runs", []).append(time_once(model, x, device, args.iters))
            except Exception as err:  # noqa: BLE001
                row["error"] = f"timing: {type(err).__name__}: {err}"
                traceback.print_exc()
        print(f"[{name}] repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{r['method']}{'' if r['keep_rate'] is None else '@%g' % r['keep_rate']}="
            f"{r['images_per_s_runs'][-1]:.1f}" for r, _ in variants if "error" not in r), flush=True)
    for row, _ in variants:
        if "error" not in row:
            row["images_per_s"] = statistics.median(row["images_per_s_runs"])
    variants.clear()
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


def _resolved_backend(device, dtype):
    try:
        import importlib
        return importlib.import_module("pm_kernels.dispatch").select("reconstruct_merge", "auto", device, dtype)
    except Exception as err:  # noqa: BLE001
        return f"unknown ({err})"


# --------------------------------------------------------------------------------------------------- plot
def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = {"dense": "o", "dense-compile": "h", "pm-torch": "s", "pm-kernels": "D", "pm-optimized": "*", "pm-compile": "P",
               "tome": "^", "evit": "v"}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for mi, model in enumerate(models):
        for r in result["rows"]:
            if r["model"] != model or not r.get("images_per_s"):
                continue
            mk = markers.get(r["method"], "x")
            runs = r.get("images_per_s_runs") or [r["images_per_s"]]
            ips = r["images_per_s"]
            ax.errorbar(r["gflops"], ips, yerr=[[ips - min(runs)], [max(runs) - ips]], fmt=mk,
                        color=colors[mi % len(colors)], ms=7, capsize=3, elinewidth=0.8)
            label = r["method"] + (f"@{r['keep_rate']}" if r["keep_rate"] is not None else "")
            ax.annotate(label, (r["gflops"], r["images_per_s"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GFLOPs / image (1 MAC = 1 FLOP)")
    ax.set_ylabel("images / s (median)")
    env = result["env"]
    label = "CPU" if env["device_type"] == "cpu" else "GPU"
    title = (f"[{label}] {env['device_name']}\nbatch {env['batch']}, {env['dtype']}, "
             f"torch {env['versions']['torch']}, models: {', '.join(models)}; "
             f"marker = median, bars = min-max of {env['repeats']} runs")
    load = env.get("loadavg_start")
    if env["device_type"] == "cpu" and load:
        cores = f" on {env['cpu_count']} cores" if env.get("cpu_count") else ""
        title += (f"\nshared CPU: load average {load[0]:.1f}{cores} ({env.get('cpu_threads')} torch threads): "
                  "ratios are unreliable")
    ax.set_title(title, fontsize=7)
    for mi, model in enumerate(models):
        ax.scatter([], [], color=colors[mi % len(colors)], label=model)
    present = {r["method"] for r in result["rows"] if r.get("images_per_s")}
    for m, mk in markers.items():
        if m not in present:
            continue
        ax.scatter([], [], marker=mk, color="gray", label=m)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda (cpu with onnxruntime)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: dense / PM / ToMe / EViT exported to ONNX, timed in ONNX Runtime on the CPU "
                        "(bench/ort_runtime.py)")
    p.add_argument("--batches", default="1,8", help="onnxruntime: batch sizes, one run")
    p.add_argument("--ort-images", type=int, default=16, help="onnxruntime: images per timed run")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=None,
                   help="comma list of deit_tiny, deit_small, deit_base or timm names "
                        "(default: all three on cuda, deit_tiny on cpu)")
    p.add_argument("--keep-rates", default="0.6,0.4", help="PM keep rates; ToMe/EViT are matched to each")
    p.add_argument("--prune-rate", type=float, default=0.1)
    p.add_argument("--scores", default="random", choices=["random", "calibrated"])
    p.add_argument("--calib-batches", type=int, default=2, help="batches for --scores calibrated")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on cuda, 2 on cpu")
    p.add_argument("--iters", type=int, default=None, help="forwards per timed run (default: 20 cuda, 3 cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (interleaved); median reported")
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
    ort = args.runtime == "onnxruntime"
    if ort and (args.device == "cuda" or args.dtype not in (None, "fp32")):
        p.error("--runtime onnxruntime runs fp32 on the CPU (CPUExecutionProvider): drop --device / --dtype")
    args.device = args.device or ("cpu" if ort else "cuda")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    cuda = args.device == "cuda"
    args.batch = args.batch or (256 if cuda else 8)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.models = [m for m in (args.models or ("deit_tiny,deit_small,deit_base" if cuda else "deit_tiny"))
                   .split(",") if m]
    args.keep_rates = [float(k) for k in args.keep_rates.split(",") if k]
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters or (20 if cuda else 3)
    if args.out is None:
        tag = "ort_cpu" if ort else ("cpu" if not cuda else "cuda")
        batch = "b" + "_".join(map(str, args.batches)) if ort else f"b{args.batch}"
        args.out = os.path.join(_ROOT, "bench", "results",
                                f"compare_{tag}_{args.dtype}_{batch}_{'_'.join(args.models)}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        if result["env"].get("runtime") == "onnxruntime":  # no plot for that mode: the table only
            from bench import ort_runtime
            ort_runtime.print_table(result)
            return result
        png = os.path.splitext(args.replot)[0] + ".png"
        plot(result, png)
        print_table(result)
        print(f"redrew {png}")
        return result
    if args.runtime == "onnxruntime":
        from bench import ort_runtime  # builds on this module's helpers: imported only when asked for
        return ort_runtime.main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu for the CPU mode)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    api, api_error = _pm_api()
    env = {
        "label": "CPU" if device.type == "cpu" else "GPU",
        "device_type": device.type, "device_name": _device_name(device),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "batch": args.batch, "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters,
        "repeats": args.repeats, "compile": args.compile, "compile_mode": args.compile_mode,
        "versions": _versions(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, _ROOT) if sys.executable.startswith(_ROOT)
                             else "python"] + sys.argv),
        "flops_convention": "analytic, 1 MAC = 1 FLOP (fvcore / DeiT / ToMe / EViT / PM papers); "
                            "matmuls only; PM includes merge K×N×C and reconstruct N×K×C; ToMe includes "
                            "the bipartite similarity; EViT includes the fusion",
        "timing": "torch.inference_mode, device-synchronised wall clock; every variant of a model is built "
                  "and warmed up first, then timed round-robin (repeat × variant, `iters` forwards each); "
                  "images/s = median over repeats",
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peak_memory": "CUDA: this variant's weights + input + (max_memory_allocated during one forward "
                       "- allocated before it); activation_mem_mib: the last term"
                       if device.type == "cuda" else "not measured on CPU (null)",
        "weights": "random init (pretrained=False); no accuracy column",
    }
    result = {"env": env, "rows": [], "notes": []}
    if args.pm_kernels_backend != "auto":
        env["pm_kernels_backend"] = args.pm_kernels_backend
    for name in args.models:
        rows, notes = bench_model(name, args, device, dtype, api, api_error)
        result["rows"] += rows
        result["notes"] += [f"{name}: {n}" for n in notes]

    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    print_table(result)
    print(f"wrote {args.out} and {png}")
    return result


def print_table(result):
    env = result["env"]
    print(f"\n[{env['label']}] {env['device_name']}  batch {env['batch']}  {env['dtype']}")
    print(f"{'model':12s} {'method':14s} {'keep':>5s} {'GFLOPs':>8s} {'xFLOPs':>7s} {'img/s':>10s} "
          f"{'speedup':>8s} {'peakMiB':>8s}  runs min-max")
    for r in result["rows"]:
        ips = r.get("images_per_s")
        print(f"{r['model']:12s} {r['method']:14s} {str(r['keep_rate'] or '-'):>5s} {r['gflops']:8.3f} "
              f"{r['gflops_vs_dense']:7.3f} {('%.1f' % ips) if ips else 'ERROR':>10s} "
              f"{('%.3f' % r['speedup_vs_dense']) if r.get('speedup_vs_dense') else '-':>8s} "
              f"{('%.0f' % r['peak_mem_mib']) if r.get('peak_mem_mib') else '-':>8s}  "
              + ("%.1f-%.1f" % (min(r["images_per_s_runs"]), max(r["images_per_s_runs"]))
                 if r.get("images_per_s_runs") else ""))
    for n in result["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
