"""Accuracy of PM vs ToMe vs EViT on the digits task over several seeds (issue 6's accuracy column).

One seed of ``bench/peers_digits.py`` decides "PM at least as accurate as ToMe / EViT" on a handful of the 450
test images, within the seed-to-seed spread. This reads one result JSON per seed (each run changes the data
split, the initialisation and the fine-tuning order together) and reports, per method and keep rate, the mean
and standard deviation of top-1, and per seed how many test images PM is ahead of (+) or behind (−) the better
of ToMe and EViT.

    python bench/peers_digits.py                 # seed 0 -> bench/results/peers_digits_CPU.json
    for s in 1 2 3 4 5 6 7 8 9; do python bench/peers_digits.py --seed $s --out bench/results/digits_seeds/seed$s.json; done
    python bench/peers_digits_summary.py bench/results/peers_digits_CPU.json bench/results/digits_seeds/seed*.json \
        --out bench/results/peers_digits_seeds_CPU.json
"""
import argparse
import json
import statistics
import sys
from typing import Dict, List

METHODS = ("dense", "PM", "ToMe", "EViT")


def summarize(results: List[dict]) -> dict:
    """Per (keep, method): top-1 per seed, mean, sample std; per keep: PM − best peer in images per seed."""
    seeds = [r["config"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"results: each seed once, got seeds {seeds}")
    keeps = sorted({row["keep_rate"] for r in results for row in r["rows"] if row["keep_rate"] is not None},
                   reverse=True)
    table: Dict[str, dict] = {}
    for keep in [None] + keeps:
        for method in METHODS:
            top1 = [row["top1"] for r in results for row in r["rows"]
                    if row["method"] == method and row["keep_rate"] == keep]
            if not top1:
                continue
            table[f"{method} keep {keep:g}" if keep else method] = {
                "keep_rate": keep, "method": method, "top1_per_seed": top1, "mean": statistics.mean(top1),
                "std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
    gap = {}
    for keep in keeps:
        per_seed = [r["target_PM_at_least_as_accurate"][f"keep {keep:g}"]["PM_minus_best_peer_images"]
                    for r in results]
        gap[f"keep {keep:g}"] = {"PM_minus_best_peer_images_per_seed": per_seed,
                                 "seeds_where_PM_at_least_as_accurate": sum(g >= 0 for g in per_seed),
                                 "mean_images": statistics.mean(per_seed)}
        # Paired by seed (same split, dense teacher and recipe), so the seed-to-seed spread of the dense
        # model's own accuracy cancels out.
        pm = table[f"PM keep {keep:g}"]["top1_per_seed"]
        for peer in ("ToMe", "EViT"):
            diff = [a - b for a, b in zip(pm, table[f"{peer} keep {keep:g}"]["top1_per_seed"])]
            gap[f"keep {keep:g}"][f"PM_minus_{peer}_points"] = {
                "per_seed": diff, "mean": statistics.mean(diff),
                "std": statistics.stdev(diff) if len(diff) > 1 else 0.0}
    return {"seeds": seeds, "n_test": results[0]["n_test"], "top1": table, "PM_vs_best_peer": gap,
            "dates": [r["date"] for r in results], "commits": sorted({r["env"]["versions"].get("git_commit", "?")
                                                                      for r in results})}


def format_summary(s: dict) -> str:
    lines = [f"seeds {s['seeds']}, {s['n_test']} test images each",
             f"{'model':<16}{'mean top-1':>11}{'std':>7}   per seed"]
    for name, v in s["top1"].items():
        lines.append(f"{name:<16}{v['mean']:>11.2f}{v['std']:>7.2f}   " + " ".join(f"{t:.2f}" for t in v["top1_per_seed"]))
    for keep, g in s["PM_vs_best_peer"].items():
        lines.append(f"PM - best of ToMe/EViT at {keep}: {g['PM_minus_best_peer_images_per_seed']} images "
                     f"(PM at least as accurate on {g['seeds_where_PM_at_least_as_accurate']} of {len(s['seeds'])} seeds)")
        for peer in ("ToMe", "EViT"):
            d = g[f"PM_minus_{peer}_points"]
            lines.append(f"  PM - {peer} at {keep}, paired by seed: mean {d['mean']:+.2f} points (std {d['std']:.2f})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="peers_digits.py result JSONs, one per seed")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    args = p.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    summary = summarize(sorted(results, key=lambda r: r["config"]["seed"]))
    summary["command"] = "python bench/peers_digits_summary.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary["table"] = format_summary(summary)
    print(summary["table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
