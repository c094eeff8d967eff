"""ONNX Runtime mode of ``bench/compare.py`` (``--runtime onnxruntime``): the models as deployed files.

For each model: the dense timm DeiT and, per keep rate, the PM model (``pm_kernels.export``: folded by
``optimize``, attention as standard ops), ToMe and EViT (matched to the exported PM model's GMACs) are exported
with the dynamo ONNX exporter (dynamic batch), checked against PyTorch (max |ORT − torch| on the timed input)
and timed in ONNX Runtime's CPU execution provider, in one process, at every batch of ``--batches``. Timing is
interleaved (repeat × variant, the order reversed on every other repeat so no variant always runs first after
another), ``--ort-images`` images per timed run; images/s = median over ``--repeats``, by wall clock and per
CPU-second of the process (the thread pool does not spin, so CPU time is the work done: the figure other
processes' load on a shared CPU disturbs least). A peer that does not export (or does not run in ONNX Runtime)
gets a row saying so and why. ``--replot`` on its JSON prints the table again.

    python bench/compare.py --runtime onnxruntime --models deit_small --repeats 7 \\
        --out bench/results/compare_ort_CPU_fp32_deit_small.json

GMACs: dense analytic (= FlopCounterMode's count), PM traced on the folded model that is exported, ToMe / EViT
analytic at the matched schedule (``bench/peers/flops.py``). MAC ratio = dense GMACs / the row's GMACs, the
ceiling of its speed-up; the issue-13 target is PM-DeiT-S speed-up ≥ 0.95 × MAC ratio.
"""
import copy
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from bench.compare import MODELS, _device_name, _pm_api, _versions, pm_scores, traced_gmacs
from bench.peers import (default_locations, dense_flops, dims_from_model, match_evit_keep_rate, match_tome_r,
                         patch_evit, patch_tome)

TARGET_FRACTION = 0.95  # of the MAC ratio, for PM rows (issue 13)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:240] if text else ''}"


def _export_plain(model, path: str, example: torch.Tensor) -> None:
    """A timm model (dense, ToMe, EViT) through the dynamo ONNX exporter, dynamic batch."""
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                      input_names=["images"], output_names=["logits"], external_data=False, verbose=False)


def _session(path: str, threads: int):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on a shared CPU a spinning pool steals the cores others time on,
    # and without spinning the process CPU time is the work done (the load-robust second figure).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return f"loadavg {os.getloadavg()}"


def _variants(name, args, api, folder, threads):
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
    if api is None:
        return out, image_shape
    from pm_kernels import export as pm_export, optimize
    scores = pm_scores(api, dense, args.scores, example, args.calib_batches, args.seed)
    locs = default_locations(d.depth)
    for keep in args.keep_rates:
        pm = api["compress"](copy.deepcopy(dense), scores, keep_rate=keep, prune_rate=args.prune_rate)
        pm_ref = optimize(pm)
        target = traced_gmacs(pm_ref, example)
        add("pm", keep, target, pm_ref, lambda p, pm=pm: pm_export(pm, p),
            {"K_per_layer": [int(b.M.shape[0]) for b in pm.blocks], "prune_rate": args.prune_rate})
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


def _time(session, feed, batch, iters):
    """(images per wall-clock second, images per CPU second of this process) over ``iters`` runs."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        session.run(None, feed)
    return batch * iters / (time.perf_counter() - t0), batch * iters / (time.process_time() - c0)


def bench_model_ort(name, args, api, folder, threads):
    variants, image_shape = _variants(name, args, api, folder, threads)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *image_shape, generator=torch.Generator().manual_seed(2))
        feed = {"images": x.numpy()}
        iters = max(1, args.ort_images // batch)
        live = []
        for template, reference, session in variants:
            row = dict(template, batch=batch)
            rows.append(row)
            if session is None:
                continue
            try:
                with torch.no_grad():
                    expected = reference(x)
                got = torch.from_numpy(session.run(None, feed)[0])   # also the warm-up
                row["max_abs_diff_vs_torch"] = float((got - expected).abs().max())
                session.run(None, feed)
                live.append((row, session))
            except Exception as err:  # noqa: BLE001
                row["error"] = f"does not run in ONNX Runtime: {_first_line(err)}"
        row_uptime = _uptime()
        for rep in range(args.repeats):
            for row, session in (live if rep % 2 == 0 else live[::-1]):
                wall, cpu = _time(session, feed, batch, iters)
                row.setdefault("images_per_s_runs", []).append(wall)
                row.setdefault("images_per_cpu_s_runs", []).append(cpu)
            print(f"[{name}] batch {batch} repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{r['method']}{'' if r['keep_rate'] is None else '@%g' % r['keep_rate']}="
                f"{r['images_per_s_runs'][-1]:.2f}" for r, _ in live), flush=True)
        base = None
        for row, _ in live:
            row["images_per_s"] = statistics.median(row["images_per_s_runs"])
            row["images_per_cpu_s"] = statistics.median(row["images_per_cpu_s_runs"])
            row["iters_per_run"] = iters
            row["uptime_before"] = row_uptime
            if row["method"] == "dense":
                base = row
        for row, _ in live:
            if base is not None:
                row["speedup_vs_dense"] = row["images_per_s"] / base["images_per_s"]
                row["speedup_over_mac_ratio"] = row["speedup_vs_dense"] / row["mac_ratio"]
                row["cpu_speedup_vs_dense"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]
                row["cpu_speedup_over_mac_ratio"] = row["cpu_speedup_vs_dense"] / row["mac_ratio"]
                if row["method"] == "pm":
                    row["meets_target"] = row["speedup_over_mac_ratio"] >= TARGET_FRACTION
                    row["meets_target_cpu_time"] = row["cpu_speedup_over_mac_ratio"] >= TARGET_FRACTION
    return rows


def main(args):
    """Run the ONNX Runtime comparison for ``args`` (from ``bench.compare.parse_args``); returns the result."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # the dynamo exporter needs it
    except ImportError as err:
        sys.exit(f"--runtime onnxruntime needs onnx, onnxscript and onnxruntime ({err}): "
                 "pip install pm_kernels[export]")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    api, api_error = _pm_api()
    versions = _versions()
    versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, onnxscript=onnxscript.__version__)
    env = {
        "label": "CPU", "runtime": "onnxruntime", "device_type": "cpu", "device_name": _device_name(
            torch.device("cpu")), "execution_provider": "CPUExecutionProvider",
        "ort_threads": threads, "torch_threads": threads, "cpu_count": os.cpu_count(),
        "batches": args.batches, "dtype": "fp32", "repeats": args.repeats, "ort_images_per_run": args.ort_images,
        "versions": versions, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv), "uptime_start": _uptime(),
        "loadavg_start": list(os.getloadavg()),
        "flops_convention": "GMACs (1 MAC = 1 FLOP); dense analytic, PM traced on the exported folded model, "
                            "ToMe / EViT analytic at their matched schedules",
        "timing": "ONNX Runtime CPUExecutionProvider, graph optimisations default (all); every variant exported, "
                  "loaded and warmed up first, then timed round-robin (repeat x variant, order reversed on odd "
                  "repeats); images/s = median over repeats of wall-clock; images/CPU-s = the same runs over "
                  "the process CPU time (thread pool spinning off), less sensitive to other processes' load",
        "target": f"PM speed-up vs dense >= {TARGET_FRACTION} x MAC ratio (issue 13)",
        "weights": "random init (pretrained=False); PM structure from search_structure on random scores",
    }
    result = {"env": env, "rows": [], "notes": [] if api is not None else [api_error]}
    with tempfile.TemporaryDirectory(prefix="pm_ort_") as folder:
        for name in args.models:
            result["rows"] += bench_model_ort(name, args, api, folder, threads)
    env["uptime_end"] = _uptime()
    env["loadavg_end"] = list(os.getloadavg())
    if env["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1) or env["loadavg_end"][0] > 0.5 * (os.cpu_count() or 1):
        result["notes"].append(f"shared CPU: load average {env['loadavg_start'][0]:.1f} at start, "
                               f"{env['loadavg_end'][0]:.1f} at end on {os.cpu_count()} cores: timings are noisy")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
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
