"""The accuracy–throughput frontier on the digits task (issue 18): PM vs ToMe vs EViT over keep rates and seeds.

For each seed: the digits demo's dense ViT and calibration; PM at keep 0.3 … 0.9; ToMe and EViT matched to
each PM model's GMACs; all fine-tuned with the demo's recipe (same epochs, lr, batch order, distillation from
the same dense teacher). Top-1 mean ± std over seeds, paired by seed; images/s at batch 1 and 8 on CPU.

Three phases, each its own command, merged into one JSON:

    # 1. accuracy (heavy: minutes per model on a shared CPU; resumable, one JSON per seed)
    nohup nice -n 15 python bench/pareto.py accuracy --seeds 0-4 > pareto_accuracy.log 2>&1 &
    #    PM variants (structure search / M, R fine-tuning), PM rows only, same dense models and scores:
    nice -n 15 python bench/pareto.py accuracy --seeds 0-4 --variant prune0.2 --keeps 0.3,0.4,0.5
    #    cheap filter for structure variants (top-1 right after compress, no fine-tuning):
    python bench/pareto.py screen --seeds 0-4
    # 2. timing (short; interleaved; records the load; re-run it alone at a quiet moment)
    python bench/pareto.py timing
    # 3. report: bench/results/pareto_digits_CPU.json + .png (and _variants.png)
    python bench/pareto.py report

``python bench/pareto.py all --seeds 0-4`` runs the three in a row.
"""
import argparse
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.frontier.accuracy import KEEP_RATES, load_seed_files, run_seed  # noqa: E402
from bench.frontier.report import format_markdown, format_summary, format_variant_markdown, summarize  # noqa: E402
from bench.frontier.timing import run_timing  # noqa: E402
from bench.frontier.variants import BASELINE, VARIANTS, timed_as  # noqa: E402

RESULTS = os.path.join(_ROOT, "bench", "results", "pareto_digits")
OUT = os.path.join(_ROOT, "bench", "results", "pareto_digits_CPU.json")


def _seeds(text: str):
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _env(threads: int) -> dict:
    from pm_kernels.measure import environment
    torch.set_num_threads(threads)
    return environment("cpu")


def _variant_files(results: str, names) -> dict:
    return {n: fs for n in names if (fs := load_seed_files(results, VARIANTS[n]))}


def _present_variants(results: str):
    folder = os.path.join(results, "variants")
    return sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n in VARIANTS)


def cmd_accuracy(args) -> None:
    torch.set_num_threads(args.threads)
    variant = VARIANTS[args.variant]
    keeps = tuple(float(k) for k in args.keeps.split(",")) if args.keeps else KEEP_RATES
    env = _env(args.threads)
    for seed in _seeds(args.seeds):
        t = time.perf_counter()
        run_seed(seed, args.results, args.work, keeps, variant, peers=variant is BASELINE and not args.no_peers,
                 env=env, log=lambda m: print(m, flush=True))
        print(f"seed {seed} ({variant.name}) done in {time.perf_counter() - t:.0f} s", flush=True)


def cmd_timing(args) -> None:
    # variants that only change M and R's fine-tuning have the baseline's structures: not timed again
    names = [n for n in _present_variants(args.results) if timed_as(VARIANTS[n]) == n] if args.variants == "all" \
        else [n for n in args.variants.split(",") if n and n != "none"]
    timing = run_timing(load_seed_files(args.results), _variant_files(args.results, names),
                        batches=tuple(int(b) for b in args.batches.split(",")), rounds=args.rounds,
                        min_time=args.min_time, threads=args.threads, device=args.device,
                        log=lambda m: print(m, flush=True))
    timing["command"] = "python bench/pareto.py " + " ".join(sys.argv[1:])
    path = os.path.join(args.results, f"timing_{args.device.upper()}.json")
    with open(path, "w") as f:
        json.dump(timing, f, indent=1)
    print(f"wrote {path} ({timing['elapsed_s']:.0f} s; load average {timing['loadavg_before'][0]:.2f} before, "
          f"{timing['loadavg_after'][0]:.2f} after{'; UNDER LOAD' if timing['under_load'] else ''})")


def cmd_screen(args) -> dict:
    from bench.frontier.screen import format_screen, screen
    torch.set_num_threads(args.threads)
    keeps = tuple(float(k) for k in args.keeps.split(",")) if args.keeps else KEEP_RATES
    names = args.variants.split(",") if args.variants else None
    result = screen(_seeds(args.seeds), keeps, args.work, names, log=lambda m: print(m, flush=True))
    text = format_screen(result)
    print(text)
    path = os.path.join(args.results, "screen.json")
    with open(path, "w") as f:
        json.dump({"command": "python bench/pareto.py " + " ".join(sys.argv[1:]), "seeds": _seeds(args.seeds),
                   "what": "top-1 right after compress (no fine-tuning), mean over seeds; a filter only",
                   "variants": result, "table": text}, f, indent=1)
    print(f"wrote {path}")
    return result


def cmd_report(args) -> dict:
    base = load_seed_files(args.results)
    if not base:
        raise SystemExit(f"no seed files in {args.results}: run the accuracy phase first")
    timing_path = os.path.join(args.results, f"timing_{args.device.upper()}.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else None
    summary = summarize(base, timing)
    timed = {e["variant"] for e in (timing or {}).get("entries", [])}
    variants = {n: summarize(fs, timing if timed_as(VARIANTS[n]) in timed else None, n, base,
                             timed_as=timed_as(VARIANTS[n]))
                for n, fs in _variant_files(args.results, _present_variants(args.results)).items()}
    result = {"command": "python bench/pareto.py " + " ".join(sys.argv[1:]),
              "what": __doc__.split("\n\n")[0], "n_test": base[0]["n_test"],
              "recipe": base[0]["finetune_config"], "dense_recipe": base[0]["dense_config"],
              "evit_locations": next((r["evit_locations"] for r in base[0]["rows"].values()
                                      if r["method"] == "EViT"), None),     # None: a PM-only run (held-out seeds)
              "accuracy_runs": {r["seed"]: r["runs"] for r in base},
              "timing": {k: v for k, v in (timing or {}).items() if k != "entries"} if timing else None,
              "frontier": summary, "variants": variants}
    kinds = ["wall", "cpu"] if timing and timing["device"] == "cpu" else ["wall"]
    text = [format_summary(summary, b, k) for k in kinds for b in ((timing or {}).get("batches") or [8])]
    text += [format_summary(v) for v in variants.values()]
    result["table"] = "\n\n".join(text)
    batches = (timing or {}).get("batches") or [8]
    result["markdown"] = {f"{k} b{b}": format_markdown(summary, b, k) for k in kinds for b in batches}
    result["markdown_variants"] = {f"{n} {k} b{b}": format_variant_markdown(v, b, k) for n, v in variants.items()
                                   for k in kinds for b in batches}
    print(result["table"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    from bench.frontier.plot import plot_frontier, plot_variants
    png = os.path.splitext(args.out)[0] + ".png"
    if timing:
        plot_frontier(result, png, args.speed, [v for v in args.plot_variants.split(",") if v])
        if variants:
            plot_variants(result, os.path.splitext(args.out)[0] + "_variants.png")
    print(f"wrote {args.out}" + (f" and {png}" if timing else " (no timing yet: no plot)"))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="per-seed JSONs and the timing JSON")
    p.add_argument("--device", default="cpu", help="timing device (cpu, or cuda when there is one)")
    sub = p.add_subparsers(dest="phase", required=True)
    acc = sub.add_parser("accuracy", help="train / fine-tune / evaluate (resumable)")
    tim = sub.add_parser("timing", help="interleaved images/s of every model, batch 1 and 8")
    rep = sub.add_parser("report", help="merge into one JSON + plot")
    allp = sub.add_parser("all", help="accuracy, timing, report")
    scr = sub.add_parser("screen", help="structure variants: top-1 before fine-tuning (seconds per model)")
    scr.add_argument("--seeds", default="0-4")
    scr.add_argument("--keeps", default=None)
    scr.add_argument("--variants", default=None, help="comma list (default: every structure variant)")
    scr.add_argument("--work", default=os.path.join("/tmp", "pm_pareto_digits"))
    scr.add_argument("--threads", type=int, default=1)
    for q in (acc, allp):
        q.add_argument("--seeds", default="0-4")
        q.add_argument("--keeps", default=None, help=f"comma list (default {','.join(map(str, KEEP_RATES))})")
        q.add_argument("--variant", default="baseline", choices=sorted(VARIANTS))
        q.add_argument("--no-peers", action="store_true", help="PM rows only")
        q.add_argument("--work", default=os.path.join("/tmp", "pm_pareto_digits"),
                       help="cache of dense checkpoints and calibration scores per seed")
    for q in (tim, allp):
        q.add_argument("--batches", default="1,8")
        q.add_argument("--rounds", type=int, default=5)
        q.add_argument("--min-time", type=float, default=0.1, help="seconds per timed run")
        q.add_argument("--variants", default="all", help="variants to time too: all (present), none, or a list")
    for q in (acc, tim, allp):
        q.add_argument("--threads", type=int, default=1)
    for q in (rep, allp):
        q.add_argument("--out", default=OUT)
        q.add_argument("--speed", choices=("wall", "cpu"), default="wall",
                       help="plot's x axis: wall-clock images/s, or images per CPU second (load-robust)")
        q.add_argument("--plot-variants", default="", help="PM variants to draw on the frontier plot too")
    args = p.parse_args(argv)
    if args.phase in ("accuracy", "all"):
        cmd_accuracy(args)
    if args.phase in ("timing", "all"):
        cmd_timing(args)
    if args.phase == "screen":
        return cmd_screen(args)
    if args.phase in ("report", "all"):
        return cmd_report(args)


if __name__ == "__main__":
    main()
