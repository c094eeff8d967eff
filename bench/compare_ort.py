"""ONNX Runtime side-by-side: the models as deployed files, dense DeiT vs PM vs ToMe vs EViT (CPU).

For each model: the dense timm DeiT and, per keep rate, the PM model (``pm_kernels.export``: folded by
``optimize``, attention as standard ops), ToMe and EViT (matched to the exported PM model's GMACs) are exported
with the dynamo ONNX exporter (dynamic batch), loaded with ``pm_kernels.deploy.load_exported`` (ONNX Runtime's
CPU execution provider, ``--threads`` intra-op threads, idle threads sleeping), checked against PyTorch (max
|ORT − torch| on the timed input) and timed in one process at every batch of ``--batches``:
``pm_kernels.measure.time_interleaved``, ``--ort-images`` images per round, median over ``--repeats`` rounds, by
wall clock and per CPU-second of the process (the figure other processes' load on a shared CPU disturbs least).
A peer that does not export (or does not run in ONNX Runtime) gets a row saying so and why. ``--replot`` on its
JSON prints the table again.

    python bench/compare_ort.py --models deit_small --repeats 7 --out bench/results/compare_ort_CPU_fp32_deit_small.json

GMACs: dense analytic (= FlopCounterMode's count), PM traced on the folded model that is exported, ToMe / EViT
analytic at the matched schedule (``bench/peers/flops.py``). MAC ratio = dense GMACs / the row's GMACs, the
ceiling of its speed-up; the issue-13 target is PM-DeiT-S speed-up >= 0.95 × MAC ratio. (Until issue 23 this was
``bench/compare.py --runtime onnxruntime``, the command recorded in the older results files.)
"""
import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.common import MODELS, pm_scores  # noqa: E402
from bench.peers import (default_locations, dense_flops, dims_from_model, match_evit_keep_rate,  # noqa: E402
                         match_tome_r, patch_evit, patch_tome)
from pm_kernels.deploy import load_exported  # noqa: E402
from pm_kernels.measure import environment, finish_environment, kept_tokens, time_interleaved, traced_macs  # noqa: E402,E501
from pm_kernels.pipeline.io import save_json  # noqa: E402

TARGET_FRACTION = 0.95  # of the MAC ratio, for PM rows (issue 13)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:240] if text else ''}"


def _export_plain(model, path: str, example: torch.Tensor) -> None:
    """A timm model (dense, ToMe, EViT) through the dynamo ONNX exporter, dynamic batch."""
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                      input_names=["images"], output_names=["logits"], external_data=False, verbose=False)


def _session(path: str, threads: int):
    # Idle threads sleep instead of spinning: on a shared CPU a spinning pool steals the cores others time on,
    # and without spinning the process CPU time is the work done (the load-robust second figure).
    return load_exported(path, threads=threads, session_config={"session.intra_op.allow_spinning": "0"})


def _variants(name, args, folder, threads):
    """Export every variant of one model: ``([(row_template, reference_model, session or None)], image shape)``."""
    import timm
    timm_name = MODELS.get(name, name)
    torch.manual_seed(args.seed)
    dense = timm.create_model(timm_name, pretrained=False).eval()
    d = dims_from_model(dense)
    image_shape = (dense.patch_embed.proj.in_channels, *dense.patch_embed.img_size)
    example = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(1))
    out = []

    def add(method, keep, gmacs, reference, export, extra=None):
        row = {"model": name, "timm_name": timm_name, "method": method, "keep_rate": keep, "gflops": gmacs,
               "mac_ratio": dense_flops(d) / gmacs, **(extra or {})}
        path = os.path.join(folder, f"{name}_{method}_{keep}.onnx")
        print(f"[{name}] {method:6s} keep={keep} GMACs={gmacs:.3f}: export to ONNX", flush=True)
        t0 = time.perf_counter()
        try:
            export(path)
            row["export_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001
            row["error"] = f"does not export: {_first_line(err)}"
            traceback.print_exc()
            out.append((row, None, None))
            return
        try:
            session = _session(path, threads)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"does not load in ONNX Runtime: {_first_line(err)}"
            out.append((row, None, None))
            return
        out.append((row, reference, session))

    add("dense", None, dense_flops(d), dense, lambda p: _export_plain(copy.deepcopy(dense), p, example))
    from pm_kernels import compress, export as pm_export, optimize
    scores = pm_scores(dense, args.scores, example, args.calib_batches, args.seed)
    locs = default_locations(d.depth)
    for keep in args.keep_rates:
        pm = compress(copy.deepcopy(dense), scores, keep_rate=keep, prune_rate=args.prune_rate)
        pm_ref = optimize(pm)
        target = traced_macs(pm_ref, example[:1]) / 1e9
        add("pm", keep, target, pm_ref, lambda p, pm=pm: pm_export(pm, p),
            {"K_per_layer": kept_tokens(pm), "prune_rate": args.prune_rate})
        # Export mutates the ToMe state (tracing writes fake tensors into it): export a copy, check the other.
        r, g_tome = match_tome_r(d, target)
        tome = patch_tome(copy.deepcopy(dense), r)
        add("tome", keep, g_tome, tome, lambda p, m=tome: _export_plain(copy.deepcopy(m), p, example),
            {"r_schedule": r, "target_gflops": target})
        k_evit, g_evit = match_evit_keep_rate(d, target, locs)
        evit = patch_evit(copy.deepcopy(dense), k_evit, locs)
        add("evit", keep, g_evit, evit, lambda p, m=evit: _export_plain(copy.deepcopy(m), p, example),
            {"evit_keep_rate": k_evit, "evit_locations": locs, "target_gflops": target})
    return out, image_shape


def bench_model_ort(name, args, folder, threads):
    variants, image_shape = _variants(name, args, folder, threads)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *image_shape, generator=torch.Generator().manual_seed(2))
        live = {}
        for template, reference, session in variants:
            row = dict(template, batch=batch)
            rows.append(row)
            if session is None:
                continue
            try:
                with torch.no_grad():
                    expected = reference(x)
                row["max_abs_diff_vs_torch"] = float((session(x) - expected).abs().max())   # also the warm-up
                live[f"{row['method']}@{row['keep_rate']}"] = (row, session)
            except Exception as err:  # noqa: BLE001  (a peer that does not run still gets its row)
                row["error"] = f"does not run in ONNX Runtime: {_first_line(err)}"
        iters = max(1, args.ort_images // batch)
        rates = time_interleaved({key: (lambda s=session: s(x)) for key, (_, session) in live.items()}, items=batch,
                                 rounds=args.repeats, calls=iters, warmup=1,
                                 log=lambda line: print(f"[{name}] batch {batch} {line}", flush=True))
        base = None
        for key, (row, _) in live.items():
            row.update(rates[key].to_dict(), iters_per_run=iters)
            if row["method"] == "dense":
                base = row
        for row, _ in live.values():
            if base is not None:
                row["speedup_vs_dense"] = row["images_per_s"] / base["images_per_s"]
                row["speedup_over_mac_ratio"] = row["speedup_vs_dense"] / row["mac_ratio"]
                row["cpu_speedup_vs_dense"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]
                row["cpu_speedup_over_mac_ratio"] = row["cpu_speedup_vs_dense"] / row["mac_ratio"]
                if row["method"] == "pm":
                    row["meets_target"] = row["speedup_over_mac_ratio"] >= TARGET_FRACTION
                    row["meets_target_cpu_time"] = row["cpu_speedup_over_mac_ratio"] >= TARGET_FRACTION
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_small", help="comma list of deit_tiny, deit_small, deit_base or timm names")
    p.add_argument("--batches", default="1,8", help="batch sizes, one run")
    p.add_argument("--ort-images", type=int, default=16, help="images per timed round")
    p.add_argument("--keep-rates", default="0.6,0.4", help="PM keep rates; ToMe/EViT are matched to each")
    p.add_argument("--prune-rate", type=float, default=0.1)
    p.add_argument("--scores", default="random", choices=["random", "calibrated"])
    p.add_argument("--calib-batches", type=int, default=2, help="batches for --scores calibrated")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds; median reported")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op (and torch) threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, metavar="JSON", help="no measurement: print the table of a result")
    p.add_argument("--out", default=None, help="JSON path; default bench/results/compare_ort_cpu_...")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.keep_rates = [float(k) for k in args.keep_rates.split(",") if k]
    if args.out is None:
        args.out = os.path.join(_ROOT, "bench", "results", f"compare_ort_cpu_fp32_{'_'.join(args.models)}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        print_table(result)
        return result
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        sys.exit(f"this benchmark needs onnx, onnxscript and onnxruntime ({err}): pip install pm_kernels[export]")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    env = environment("cpu", label="CPU", runtime="onnxruntime", execution_provider="CPUExecutionProvider",
                      ort_threads=threads, batches=args.batches, dtype="fp32", repeats=args.repeats,
                      ort_images_per_run=args.ort_images,
                      flops_convention="GMACs (1 MAC = 1 FLOP); dense analytic, PM traced on the exported folded "
                                       "model, ToMe / EViT analytic at their matched schedules",
                      timing="ONNX Runtime CPUExecutionProvider (pm_kernels.deploy.load_exported), graph "
                             "optimisations default; every variant exported, loaded and warmed up first, then "
                             "pm_kernels.measure.time_interleaved; images/s = median over rounds of wall clock; "
                             "images/CPU-s = the same rounds over the process CPU time (thread pool spinning off)",
                      target=f"PM speed-up vs dense >= {TARGET_FRACTION} x MAC ratio (issue 13)",
                      weights="random init (pretrained=False); PM structure from search_structure on random scores")
    result = {"env": env, "rows": [], "notes": []}
    with tempfile.TemporaryDirectory(prefix="pm_ort_") as folder:
        for name in args.models:
            result["rows"] += bench_model_ort(name, args, folder, threads)
    finish_environment(env)
    if env.get("under_load"):
        result["notes"].append(f"shared CPU: load average {env['load_average_start'][0]:.1f} at start, "
                               f"{env['load_average_end'][0]:.1f} at end on {os.cpu_count()} cores: timings are noisy")
    save_json(result, args.out)
    print_table(result)
    print(f"wrote {args.out}")
    return result


def print_table(result):
    env = result["env"]
    print(f"\n[CPU, ONNX Runtime {env['versions']['onnxruntime']}] {env['device_name']}  {env['ort_threads']} "
          f"threads  fp32  median of {env['repeats']}")
    print(f"{'model':11s} {'method':6s} {'keep':>4s} {'batch':>5s} {'GMACs':>6s} {'MACx':>5s} {'img/s':>8s} "
          f"{'x dense':>7s} {'/MACx':>6s} {'cpu x':>6s} {'/MACx':>6s} {'|ORT-pt|':>8s}  runs min-max")
    for r in result["rows"]:
        head = (f"{r['model']:11s} {r['method']:6s} {str(r['keep_rate'] or '-'):>4s} {r['batch']:5d} "
                f"{r['gflops']:6.3f} {r['mac_ratio']:5.2f}")
        if r.get("error"):
            print(f"{head}  {r['error']}")
            continue
        ips = r.get("images_per_s")
        runs = r.get("images_per_s_runs") or []
        print(f"{head} {('%.2f' % ips) if ips else '-':>8s} "
              f"{('%.3f' % r['speedup_vs_dense']) if r.get('speedup_vs_dense') else '-':>7s} "
              f"{('%.3f' % r['speedup_over_mac_ratio']) if r.get('speedup_over_mac_ratio') else '-':>6s} "
              f"{('%.3f' % r['cpu_speedup_vs_dense']) if r.get('cpu_speedup_vs_dense') else '-':>6s} "
              f"{('%.3f' % r['cpu_speedup_over_mac_ratio']) if r.get('cpu_speedup_over_mac_ratio') else '-':>6s} "
              f"{r.get('max_abs_diff_vs_torch', float('nan')):8.1e}  "
              + (f"{min(runs):.2f}-{max(runs):.2f}" if runs else ""))
    for n in result["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
