"""Seeds of ``bench/seg_peers.py`` gathered: mIoU mean ± std per method and keep rate, paired differences
(PM − dense, PM − ToMe, seed by seed: same data, same dense model per seed), the issue-12 targets, a plot.

    python bench/seg_peers_summary.py bench/results/seg_seeds/seed*.json --out bench/results/seg_peers_CPU.json
"""
import argparse
import json
import os
import statistics
import sys


def mean_std(values):
    values = list(values)
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarise(runs):
    keeps = runs[0]["config"]["keep_rates"]
    by_seed = [{(r["method"], r["keep_rate"]): r for r in run["rows"]} for run in runs]
    table = {"dense": {"miou": mean_std(s[("dense", None)]["miou"] for s in by_seed),
                       "gmacs": by_seed[0][("dense", None)]["gmacs"],
                       "images_per_s": mean_std(s[("dense", None)]["images_per_s"] for s in by_seed)}}
    paired, targets = {}, {}
    for keep in keeps:
        for method in ("PM", "ToMe"):
            rows = [s[(method, keep)] for s in by_seed]
            table[f"{method} keep {keep:g}"] = {
                "miou": mean_std(r["miou"] for r in rows), "gmacs": mean_std(r["gmacs"] for r in rows),
                "images_per_s": mean_std(r["images_per_s"] for r in rows),
                "speedup": mean_std(r["speedup"] for r in rows),
                "miou_before_finetune": mean_std(r["miou_before_finetune"] for r in rows
                                                 if r.get("miou_before_finetune") is not None)}
        paired[f"keep {keep:g}"] = {
            "PM_minus_dense": mean_std(s[("PM", keep)]["miou"] - s[("dense", None)]["miou"] for s in by_seed),
            "PM_minus_ToMe": mean_std(s[("PM", keep)]["miou"] - s[("ToMe", keep)]["miou"] for s in by_seed),
            "ToMe_minus_dense": mean_std(s[("ToMe", keep)]["miou"] - s[("dense", None)]["miou"] for s in by_seed)}
    controls = all("dense+FT" in run.get("controls", {}) for run in runs)
    if controls:  # bench/seg_dense_ft.py: the dense model given the same fine-tune (extra training, no compression)
        ctrl = [run["controls"]["dense+FT"]["miou"] for run in runs]
        table["dense+FT"] = {"miou": mean_std(ctrl), "gmacs": table["dense"]["gmacs"],
                             "images_per_s": table["dense"]["images_per_s"]}
        for keep in keeps:
            paired[f"keep {keep:g}"]["PM_minus_denseFT"] = mean_std(
                s[("PM", keep)]["miou"] - c for s, c in zip(by_seed, ctrl))
            paired[f"keep {keep:g}"]["ToMe_minus_denseFT"] = mean_std(
                s[("ToMe", keep)]["miou"] - c for s, c in zip(by_seed, ctrl))
    for keep, tol in ((0.8, 0.5), (0.7, 1.0)):
        if f"keep {keep:g}" in paired:
            d = paired[f"keep {keep:g}"]["PM_minus_dense"]["mean"]
            targets[f"PM keep {keep:g} within {tol} mIoU of dense"] = {"PM_minus_dense": d, "met": d >= -tol}
            if controls:
                d = paired[f"keep {keep:g}"]["PM_minus_denseFT"]["mean"]
                targets[f"PM keep {keep:g} within {tol} mIoU of dense + the same fine-tune"] = {
                    "PM_minus_denseFT": d, "met": d >= -tol}
    if "keep 0.7" in paired:
        d = paired["keep 0.7"]["PM_minus_ToMe"]["mean"]
        targets["PM >= ToMe-with-unmerge at keep 0.7 (matched GMACs)"] = {"PM_minus_ToMe": d, "met": d >= 0}
    return table, paired, targets


def plot(table, keeps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.2, 4.2), dpi=130)
    for method, fmt, colour in (("PM", "o-", "C0"), ("ToMe", "^-", "C1")):
        rows = [table[f"{method} keep {k:g}"] for k in keeps]
        xs = [r["gmacs"]["mean"] * 1e3 for r in rows]
        ys = [r["miou"]["mean"] for r in rows]
        ax.errorbar(xs, ys, yerr=[r["miou"]["std"] for r in rows], fmt=fmt, color=colour, capsize=3,
                    label="Prune-and-Merge" if method == "PM" else "ToMe + unmerge")
        for k, x, y in zip(keeps, xs, ys):
            ax.annotate(f"{y:.1f} (keep {k:g})", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=6,
                        color=colour)
    dense = table["dense"]
    ax.errorbar([dense["gmacs"] * 1e3], [dense["miou"]["mean"]], yerr=[dense["miou"]["std"]], fmt="*", ms=12,
                color="C3", label=f"dense ({dense['miou']['mean']:.1f})")
    ax.axhline(dense["miou"]["mean"], color="C3", lw=0.8, ls="--")
    if "dense+FT" in table:
        ctrl = table["dense+FT"]
        ax.errorbar([ctrl["gmacs"] * 1e3], [ctrl["miou"]["mean"]], yerr=[ctrl["miou"]["std"]], fmt="P", ms=9,
                    color="C2", label=f"dense + the same fine-tune ({ctrl['miou']['mean']:.1f})")
        ax.axhline(ctrl["miou"]["mean"], color="C2", lw=0.8, ls=":")
    ax.set_xlabel("MMACs / image (backbone analytic + decoder)")
    ax.set_ylabel("mIoU on the validation canvases (%), mean ± std over seeds")
    ax.set_title(title, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="per-seed JSON files of bench/seg_peers.py")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    seeds = [r["config"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"runs: one file per seed expected, got seeds {seeds}")
    table, paired, targets = summarise(runs)
    keeps = runs[0]["config"]["keep_rates"]
    lines = [f"{'model':<14} {'mIoU % (mean ± std)':>20} {'GMACs':>8} {'img/s':>8}"]
    for name, row in table.items():
        g = row["gmacs"] if isinstance(row["gmacs"], float) else row["gmacs"]["mean"]
        lines.append(f"{name:<14} {row['miou']['mean']:>12.2f} ± {row['miou']['std']:<5.2f} {g:>8.5f} "
                     f"{row['images_per_s']['mean']:>8.1f}")
    lines.append("paired over seeds (mean ± std): " + "; ".join(
        f"{k}: PM−dense {v['PM_minus_dense']['mean']:+.2f} ± {v['PM_minus_dense']['std']:.2f}, PM−ToMe "
        f"{v['PM_minus_ToMe']['mean']:+.2f} ± {v['PM_minus_ToMe']['std']:.2f}"
        + (f", PM−(dense+FT) {v['PM_minus_denseFT']['mean']:+.2f} ± {v['PM_minus_denseFT']['std']:.2f}"
           if "PM_minus_denseFT" in v else "") for k, v in paired.items()))
    text = "\n".join(lines)
    print(text)
    for name, t in targets.items():
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({', '.join(f'{k} {v:+.2f}' for k, v in t.items() if k != 'met')})")
    env = runs[0]["env"]
    result = {"command": "python bench/seg_peers_summary.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seeds": seeds, "runs": [os.path.relpath(p) for p in args.runs], "table": table, "paired": paired,
              "targets": targets, "text": text,
              "env": {"cpu_name": env["cpu_name"], "threads": env["threads"],
                      "loadavg_start": [r["env"]["loadavg_start"] for r in runs], "versions": env["versions"]},
              "config": runs[0]["config"], "finetune_config": runs[0]["finetune_config"]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    kw = runs[0].get("model_kwargs") or {}
    depth, size = kw.get("depth", "?"), runs[0]["config"]["img_size"]
    plot(table, keeps, png, f"digits Segmenter ({depth} blocks, {size}², mask decoder), {runs[0]['n_val']} validation "
                            f"canvases, seeds {seeds}:\nPM per layer vs ToMe with unmerge at matched GMACs, both "
                            f"fine-tuned {runs[0]['config']['ft_epochs']:g} epochs with per-pixel distillation\n"
                            f"[CPU] {env['cpu_name']}, {env['threads']} thread(s), shared")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
