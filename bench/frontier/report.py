"""Report phase of the digits frontier: accuracy over seeds + timing → one JSON, a table and the plot.

- top-1 per (method, keep): per seed, mean, sample std; GMACs (mean over seeds); images/s at batch 1 and 8
  (PM in its inference form, ``pm_kernels.optimize``; the eager PM model is listed too), mean over the seeds'
  structures.
- Paired by seed, at matched GMACs: PM − ToMe, PM − EViT at each keep rate.
- Paired by seed, **at equal speed**: each peer model against the PM model nearest in speed that is not slower;
  also along each seed's PM curve interpolated linearly at the peer's speed. A peer faster than every PM model
  has no PM counterpart and is reported as such (no extrapolation).
"""
import statistics
from typing import Dict, List, Optional

METHODS = ("PM", "ToMe", "EViT")


def _ms(values: List[float]) -> Dict[str, object]:
    return {"per_seed": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


# wall clock, and per CPU second of the (one-thread) timing process: the load-robust figure
SPEED_KINDS = {"wall": "images_per_s", "cpu": "images_per_cpu_s"}


def _speeds(timing: Optional[dict], batches) -> Dict[tuple, Dict[str, Dict[int, float]]]:
    """{(variant, name, keep): {column: {seed: rate}}} for every rate column (``images_per_s_b8``, ...)."""
    out: Dict[tuple, Dict[str, Dict[int, float]]] = {}
    if not timing:
        return out
    for e in timing["entries"]:
        key = (e["variant"], e["name"], e["keep_rate"])
        for b in batches:
            for prefix in SPEED_KINDS.values():
                if f"{prefix}_b{b}" in e:
                    out.setdefault(key, {}).setdefault(f"{prefix}_b{b}", {})[e["seed"]] = e[f"{prefix}_b{b}"]
    return out


def _interp(xs: List[float], ys: List[float], x: float) -> Optional[float]:
    pts = sorted(zip(xs, ys))
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def summarize(seed_files: List[dict], timing: Optional[dict] = None, variant_name: str = "baseline",
              baseline_files: Optional[List[dict]] = None, timed_as: Optional[str] = None) -> dict:
    """Per-keep statistics of one set of seed files (the baseline run, or a PM variant's PM rows).

    ``timed_as``: the variant whose timing entries hold this one's speeds (the baseline's for a variant that
    only changes M and R's fine-tuning: same structures)."""
    timed_as = timed_as or variant_name
    batches = timing["batches"] if timing else []
    speeds = _speeds(timing, batches)
    seeds = [r["seed"] for r in seed_files]
    keeps = sorted({row["keep_rate"] for r in seed_files for row in r["rows"].values() if row["keep_rate"]})
    table = {}
    names = ("dense",) + METHODS if variant_name == "baseline" else ("PM",)
    for keep in [None] + keeps:
        for method in names:
            if (method == "dense") != (keep is None):
                continue
            key = method if keep is None else f"{method} keep {keep:g}"
            rows = [r["rows"][key] for r in seed_files if key in r["rows"]]
            if not rows:
                continue
            entry = {"method": method, "keep_rate": keep, "seeds": [r["seed"] for r in seed_files if key in r["rows"]],
                     "top1": _ms([row["top1"] for row in rows]),
                     "gmacs": statistics.mean(row["gmacs"] for row in rows)}
            if "top1_before_finetune" in rows[0]:
                entry["top1_before_finetune"] = _ms([row["top1_before_finetune"] for row in rows])
            if method == "PM":
                entry["K_per_layer_per_seed"] = [row["K_per_layer"] for row in rows]
                entry["prune_rate"] = rows[0]["prune_rate"]
            for name in ([method, "PM eager"] if method == "PM" and variant_name == "baseline" else [method]):
                sp = speeds.get((timed_as if method != "dense" else "baseline", name, keep))
                tag = "" if name == method else "_eager"
                for col, per_seed in (sp or {}).items():
                    vals = list(per_seed.values())
                    entry[f"{col}{tag}"] = statistics.mean(vals)
                    entry[f"{col}{tag}_std_over_seeds"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            table[key] = entry
    out = {"variant": variant_name, "seeds": seeds, "keeps": keeps, "top1": table}
    if variant_name == "baseline":
        out["matched_gmacs"] = _paired_matched(seed_files, keeps)
        peer_files, peer_table = seed_files, None
    elif baseline_files:
        out["vs_baseline_PM"] = _paired_vs(seed_files, baseline_files, keeps)
        peer_files, peer_table = baseline_files, (summarize(baseline_files, timing)["top1"] if timing else None)
    if timing and (variant_name == "baseline" or baseline_files):
        for kind, prefix in SPEED_KINDS.items():
            name = "equal_speed" if kind == "wall" else "equal_speed_cpu_time"
            out[name] = {f"batch {b}": _equal_speed(seed_files, peer_files, table, keeps, f"{prefix}_b{b}", peer_table)
                         for b in batches}
    return out


def _paired_matched(seed_files, keeps) -> dict:
    out = {}
    for keep in keeps:
        k = f"keep {keep:g}"
        for peer in ("ToMe", "EViT"):
            diffs = [r["rows"][f"PM {k}"]["top1"] - r["rows"][f"{peer} {k}"]["top1"] for r in seed_files
                     if f"PM {k}" in r["rows"] and f"{peer} {k}" in r["rows"]]
            if diffs:
                out.setdefault(k, {})[f"PM_minus_{peer}"] = _ms(diffs)
    return out


def _paired_vs(variant_files, baseline_files, keeps) -> dict:
    base = {r["seed"]: r for r in baseline_files}
    out = {}
    for keep in keeps:
        key = f"PM keep {keep:g}"
        diffs = [r["rows"][key]["top1"] - base[r["seed"]]["rows"][key]["top1"] for r in variant_files
                 if key in r["rows"] and r["seed"] in base and key in base[r["seed"]]["rows"]]
        if diffs:
            out[f"keep {keep:g}"] = _ms(diffs)
    return out


def _equal_speed(pm_files, peer_files, pm_table, keeps, col, peer_table=None) -> dict:
    """PM (or a variant) − peer at the peer's rate ``col``, paired by seed.

    Main figure: against the PM model **nearest in speed that is not slower** than the peer (chosen by speed
    alone, mean over seeds), so PM gets no credit for its speed surplus. Also: along each seed's PM curve
    interpolated linearly at the peer's speed (``interpolated``), where the peer's speed is inside the curve.
    A peer faster than every PM model has no PM counterpart (``outside``). The dense model is not a point of
    PM's curve: it is not fine-tuned, every compressed model is (4 more epochs, distilled).
    """
    peer_table = pm_table if peer_table is None else peer_table
    points = [(pm_table[f"PM keep {k:g}"][col], f"PM keep {k:g}") for k in keeps
              if col in pm_table.get(f"PM keep {k:g}", {})]
    xs = [x for x, _ in points]
    peers_by_seed = {r["seed"]: r for r in peer_files}

    def top1(seed_file, key):
        row = seed_file["rows"].get(key)
        return None if row is None else row["top1"]
    out = {}
    for peer in ("ToMe", "EViT"):
        for keep in sorted({row["keep_rate"] for r in peer_files for row in r["rows"].values() if row["method"] == peer}):
            pkey = f"{peer} keep {keep:g}"
            speed = peer_table.get(pkey, {}).get(col)
            if speed is None:
                continue
            entry = {"peer_images_per_s": speed, "pm_speed_range": [min(xs), max(xs)] if xs else None}
            not_slower = [(x, key) for x, key in points if x >= speed]
            if not not_slower:
                entry["outside"] = "faster than every PM model: no PM model this fast"
                out[pkey] = entry
                continue
            match_speed, match = min(not_slower)
            diffs, interp = [], []
            for r in pm_files:
                peer_row = peers_by_seed.get(r["seed"], {}).get("rows", {}).get(pkey)
                mine = top1(r, match)
                if peer_row is None or mine is None:
                    continue
                diffs.append(mine - peer_row["top1"])
                ys = [top1(r, key) for _, key in points]
                if None not in ys:
                    at = _interp(xs, ys, speed)
                    if at is not None:
                        interp.append(at - peer_row["top1"])
            entry.update({"pm_match": match, "pm_match_images_per_s": match_speed}, **_ms(diffs))
            if interp:
                entry["interpolated"] = _ms(interp)
            out[pkey] = entry
    return out


def format_summary(s: dict, batch: int = 8, kind: str = "wall") -> str:
    col = f"{SPEED_KINDS[kind]}_b{batch}"
    unit = "img/s" if kind == "wall" else "img/cpu-s"
    lines = [f"{s['variant']}: seeds {s['seeds']}",
             f"{'model':<16}{'GMACs':>9}{unit + ' b' + str(batch):>13}{'top-1':>8}{'std':>6}   before FT"]
    for key, e in s["top1"].items():
        sp = e.get(col)
        bf = e.get("top1_before_finetune")
        lines.append(f"{key:<16}{e['gmacs']:>9.5f}{(f'{sp:.0f}' if sp else '-'):>13}{e['top1']['mean']:>8.2f}"
                     f"{e['top1']['std']:>6.2f}" + (f"   {bf['mean']:.2f}" if bf else ""))
    for k, v in s.get("matched_gmacs", {}).items():
        lines.append(f"matched GMACs, {k}: " + ", ".join(f"{n.replace('_', ' ')} {d['mean']:+.2f} ± {d['std']:.2f}"
                                                          for n, d in v.items()))
    for k, v in s.get("vs_baseline_PM", {}).items():
        lines.append(f"vs baseline PM, {k}: {v['mean']:+.2f} ± {v['std']:.2f} (paired, {v['n']} seeds)")
    es = s.get("equal_speed" if kind == "wall" else "equal_speed_cpu_time", {}).get(f"batch {batch}", {})
    for k, v in es.items():
        if "mean" in v:
            lines.append(f"equal speed (batch {batch}), {v['pm_match']} ({v['pm_match_images_per_s']:.0f}) − {k} "
                         f"({v['peer_images_per_s']:.0f} {unit}): {v['mean']:+.2f} ± {v['std']:.2f}"
                         + (f"; interpolated {v['interpolated']['mean']:+.2f} ± {v['interpolated']['std']:.2f}"
                            if "interpolated" in v else ""))
        else:
            lines.append(f"equal speed (batch {batch}), {k} at {v['peer_images_per_s']:.0f} {unit}: {v['outside']}")
    return "\n".join(lines)


def format_markdown(s: dict, batch: int = 8, kind: str = "wall") -> str:
    """The README table: per keep rate, GMACs, speed and top-1 of each method, and PM − peer at equal speed."""
    col = f"{SPEED_KINDS[kind]}_b{batch}"
    es = s.get("equal_speed" if kind == "wall" else "equal_speed_cpu_time", {}).get(f"batch {batch}", {})
    unit = "img/s" if kind == "wall" else "img/CPU-s"
    lines = [f"| keep | MMACs PM / ToMe / EViT | {unit} b{batch} PM / ToMe / EViT | top-1 PM | ToMe | EViT "
             f"| PM − ToMe, equal speed | PM − EViT, equal speed |", "|---" * 8 + "|"]

    def cell(e, f):
        return f(e) if e else "–"

    def diff(key):
        v = es.get(key)
        if not v:
            return "–"
        if "mean" not in v:
            return "no PM model this fast"
        return f"{v['mean']:+.2f} ± {v['std']:.2f} ({v['pm_match'].replace('PM keep ', 'PM ')})"
    t = s["top1"]
    for keep in s["keeps"]:
        e = {m: t.get(f"{m} keep {keep:g}") for m in METHODS}
        lines.append(
            f"| {keep:g} | " + " / ".join(cell(e[m], lambda x: f"{x['gmacs'] * 1e3:.2f}") for m in METHODS)
            + " | " + " / ".join(cell(e[m], lambda x: f"{x[col]:.0f}" if col in x else "–") for m in METHODS)
            + " | " + " | ".join(cell(e[m], lambda x: f"{x['top1']['mean']:.2f} ± {x['top1']['std']:.2f}") for m in METHODS)
            + f" | {diff(f'ToMe keep {keep:g}')} | {diff(f'EViT keep {keep:g}')} |")
    d = t.get("dense")
    if d:
        lines.append(f"| dense | {d['gmacs'] * 1e3:.2f} | {d.get(col, 0):.0f} | {d['top1']['mean']:.2f} ± "
                     f"{d['top1']['std']:.2f} | | | | |")
    return "\n".join(lines)


def format_variant_markdown(v: dict, batch: int = 8, kind: str = "wall") -> str:
    """One PM variant: top-1, paired change against the baseline PM, and against the peers at equal speed."""
    es = v.get("equal_speed" if kind == "wall" else "equal_speed_cpu_time", {}).get(f"batch {batch}", {})
    lines = [f"| keep | seeds | top-1 PM {v['variant']} | − baseline PM, paired | − ToMe, equal speed "
             f"| − EViT, equal speed |", "|---" * 6 + "|"]

    def diff(entry):
        if not entry:
            return "–"
        if "mean" not in entry:
            return "no PM model this fast"
        match = f" ({entry['pm_match'].replace('PM keep ', 'PM ')})" if "pm_match" in entry else ""
        return f"{entry['mean']:+.2f} ± {entry['std']:.2f}{match}"
    for keep in v["keeps"]:
        e = v["top1"].get(f"PM keep {keep:g}")
        if not e:
            continue
        lines.append(f"| {keep:g} | {e['top1']['n']} | {e['top1']['mean']:.2f} ± {e['top1']['std']:.2f} "
                     f"| {diff(v.get('vs_baseline_PM', {}).get(f'keep {keep:g}'))} "
                     f"| {diff(es.get(f'ToMe keep {keep:g}'))} | {diff(es.get(f'EViT keep {keep:g}'))} |")
    return "\n".join(lines)
