"""Plots of the digits frontier: top-1 vs images/s (one panel per batch size), and the PM variants."""
__all__ = ["plot_frontier", "plot_variants"]

STYLES = {"PM": ("o-", "C0", "Prune-and-Merge (optimize)"), "ToMe": ("^-", "C1", "ToMe"), "EViT": ("v-", "C2", "EViT")}


def _curve(table, method, col):
    rows = sorted((e for e in table.values() if e["method"] == method and col in e), key=lambda e: e["keep_rate"])
    return rows


def plot_frontier(result: dict, path: str, kind: str = "wall", variants=()) -> None:
    """``kind``: "wall" (images/s) or "cpu" (images per CPU second of the one-thread timing process);
    ``variants``: PM variants drawn as extra curves (when timed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing, table = result["timing"], result["frontier"]["top1"]
    batches = timing["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.0 * len(batches), 4.8), dpi=130, squeeze=False)
    for ax, b in zip(axes[0], sorted(batches, reverse=True)):
        col = f"{'images_per_s' if kind == 'wall' else 'images_per_cpu_s'}_b{b}"
        for method, (fmt, color, label) in STYLES.items():
            rows = _curve(table, method, col)
            if not rows:
                continue
            ax.errorbar([e[col] for e in rows], [e["top1"]["mean"] for e in rows],
                        yerr=[e["top1"]["std"] for e in rows], xerr=[e[f"{col}_std_over_seeds"] for e in rows],
                        fmt=fmt, color=color, label=label, capsize=2, lw=1.2, ms=4, elinewidth=0.7, alpha=0.9)
            for e in rows:
                ax.annotate(f"{e['keep_rate']:g}", (e[col], e["top1"]["mean"]), textcoords="offset points",
                            xytext=(3, {"PM": 5, "ToMe": -10, "EViT": 8}[method]), fontsize=6, color=color)
        for i, name in enumerate(variants):
            rows = _curve(result["variants"].get(name, {}).get("top1", {}), "PM", col)
            if rows:
                ax.errorbar([e[col] for e in rows], [e["top1"]["mean"] for e in rows],
                            yerr=[e["top1"]["std"] for e in rows], fmt="s--", color=f"C{9 - i}", capsize=2, lw=1.2,
                            ms=4, elinewidth=0.7, alpha=0.9, label=f"PM, variant {name}")
        eager = _curve(table, "PM", f"{col}_eager")
        if eager:
            ax.plot([e[f"{col}_eager"] for e in eager], [e["top1"]["mean"] for e in eager], ":", color="C0",
                    alpha=0.6, lw=1, label="PM, eager (not folded)")
        dense = table.get("dense")
        if dense and col in dense:
            ax.errorbar([dense[col]], [dense["top1"]["mean"]], yerr=[dense["top1"]["std"]], fmt="*", ms=12,
                        color="C3", label=f"dense ({dense['top1']['mean']:.2f})", capsize=2)
        unit = "images/s (wall clock)" if kind == "wall" else "images per CPU second (load-robust)"
        ax.set_xlabel(f"{unit}, batch {b} ({timing['device'].upper()}, {timing['threads']} thread(s))")
        ax.set_ylabel(f"top-1 % (mean ± std over {len(result['frontier']['seeds'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        load = timing["loadavg_before"][0], timing["loadavg_after"][0]
        warn = "  TIMED UNDER LOAD" if timing["under_load"] else ""
        ax.set_title(f"digits ViT, keep 0.3-0.9 (labels), peers matched to PM's GMACs, batch {b}\n"
                     f"{timing['cpu_name'][:40]}, load avg {load[0]:.1f} -> {load[1]:.1f} on "
                     f"{timing['cpu_count']} cores{warn}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_variants(result: dict, path: str) -> None:
    """top-1 vs GMACs: baseline PM, ToMe, EViT and every PM variant (variants are PM-only runs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    table = result["frontier"]["top1"]
    for method, (fmt, color, label) in STYLES.items():
        rows = sorted((e for e in table.values() if e["method"] == method), key=lambda e: e["gmacs"])
        ax.plot([e["gmacs"] * 1e3 for e in rows], [e["top1"]["mean"] for e in rows], fmt, color=color, lw=2,
                label=label.replace(" (optimize)", " baseline"))
    for i, (name, v) in enumerate(sorted(result["variants"].items())):
        rows = sorted(v["top1"].values(), key=lambda e: e["gmacs"])
        ax.plot([e["gmacs"] * 1e3 for e in rows], [e["top1"]["mean"] for e in rows], ".--", lw=0.8,
                color=f"C{(i + 4) % 10}", label=f"PM {name}")
    ax.set_xlabel("MMACs / image (analytic; PM unfolded)")
    ax.set_ylabel("top-1 % (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title("digits: PM variants (structure search, M/R fine-tuning) vs baseline and peers", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
