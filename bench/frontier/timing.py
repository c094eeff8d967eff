"""Timing phase of the digits frontier: images/s of every model of the accuracy phase, rebuilt from its row
(structure only: random weights, since speed does not depend on the weights' values), at batch 1 and 8,
interleaved (``pm_kernels.measure.time_interleaved``: each round times every model at every batch size once;
median over rounds), one process, one run.

The machine's load is recorded (the environment record: load average before and after); a run whose load
average says other work shared the cores is marked ``under_load`` and the report and plot say so. The phase is
self-contained: it reads only the committed seed files, so it can be re-run alone at a quiet moment.
"""
import copy
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch

from bench.peers import patch_evit, patch_tome
from pm_kernels import LayerStructure, install_structure, optimize, patch_timm
from pm_kernels.measure import environment, finish_environment, forward, time_interleaved
from pm_kernels.measure.timing import UNDER_LOAD
from pm_kernels.pipeline.families import DIGITS_VIT, DIGITS_VIT_KWARGS
from pm_kernels.pipeline.model import build_model

from .accuracy import INPUT

__all__ = ["build_timed_models", "time_models", "run_timing", "UNDER_LOAD"]


def _mask(indices: Sequence[int], n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(indices)] = True
    return m


def rebuild(row: dict, dense) -> Dict[str, torch.nn.Module]:
    """The timed forms of one row: PM eager and PM folded by ``optimize``; ToMe; EViT."""
    if row["method"] == "PM":
        st = row["structure"]
        scores = torch.tensor(st["scores"], dtype=torch.float32)
        n = scores.shape[1]
        structure = [LayerStructure(pruned=_mask(p, n), centres=_mask(c, n)) for p, c in zip(st["pruned"], st["centres"])]
        torch.manual_seed(0)
        pm = patch_timm(build_model(DIGITS_VIT, {}))
        install_structure(pm, structure, scores)
        pm.eval()
        return {"PM eager": pm, "PM": optimize(pm)}
    if row["method"] == "ToMe":
        return {"ToMe": patch_tome(copy.deepcopy(dense), row["r_schedule"]).eval()}
    if row["method"] == "EViT":
        return {"EViT": patch_evit(copy.deepcopy(dense), row["evit_keep_rate"], row["evit_locations"]).eval()}
    if row["method"] == "dense":
        return {"dense": dense}
    raise ValueError(f"row: unknown method {row['method']!r}")


def build_timed_models(seed_files: List[dict], variant_files: Dict[str, List[dict]]) -> List[Tuple[dict, torch.nn.Module]]:
    """[(label, model)]: the dense model once, then every (seed, keep) row of every method and variant."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    dense = VisionTransformer(**DIGITS_VIT_KWARGS).eval()
    out = [({"name": "dense", "variant": "baseline", "keep_rate": None, "seed": None}, dense)]
    for variant, files in [("baseline", seed_files)] + sorted(variant_files.items()):
        for res in files:
            for key, row in res["rows"].items():
                if row["method"] == "dense" or (variant != "baseline" and row["method"] != "PM"):
                    continue
                for name, model in rebuild(row, dense).items():
                    if variant != "baseline" and name == "PM eager":
                        continue
                    out.append(({"name": name, "variant": variant, "keep_rate": row["keep_rate"],
                                 "seed": res["seed"]}, model))
    return out


def time_models(models: List[torch.nn.Module], batches: Sequence[int], rounds: int, min_time: float,
                device: str = "cpu") -> Dict[str, Dict[int, List[List[float]]]]:
    """{"wall" | "cpu": {batch: per model, the rate of each round}}; each round times every model once per
    batch size. "cpu" divides by the process's CPU time: with one thread it is what the wall clock would
    read on an idle core, so it is the load-robust figure on a shared machine (a GPU run: wall only)."""
    inputs = {b: torch.randn(b, *INPUT, device=device) for b in batches}
    cases = {(i, b): forward(m, inputs[b]) for i, m in enumerate(models) for b in batches}
    rates = time_interleaved(cases, items={(i, b): b for i, b in cases}, rounds=rounds, min_time=min_time, warmup=3,
                             device=device)
    return {kind: {b: [getattr(rates[(i, b)], kind) for i in range(len(models))] for b in batches}
            for kind in ("wall", "cpu")}


def run_timing(seed_files, variant_files, batches=(1, 8), rounds: int = 5, min_time: float = 0.1,
               threads: int = 1, device: str = "cpu", log=print) -> dict:
    torch.set_num_threads(threads)
    labelled = build_timed_models(seed_files, variant_files)
    if device != "cpu":
        labelled = [(lab, m.to(device)) for lab, m in labelled]
    log(f"timing {len(labelled)} models at batch {list(batches)}, {rounds} interleaved rounds")
    env = environment(device)
    t = time.perf_counter()
    runs = time_models([m for _, m in labelled], batches, rounds, min_time, device)
    elapsed = time.perf_counter() - t
    finish_environment(env)
    entries = []
    for i, (lab, _) in enumerate(labelled):
        entry = dict(lab)
        for b in batches:
            entry[f"images_per_s_b{b}"] = statistics.median(runs["wall"][b][i])
            entry[f"images_per_s_b{b}_runs"] = runs["wall"][b][i]
            if device == "cpu":
                entry[f"images_per_cpu_s_b{b}"] = statistics.median(runs["cpu"][b][i])
        entries.append(entry)
    return {"date": env["date_utc"], "device": device, "cpu_name": env["cpu_name"], "cpu_count": env["cpu_count"],
            "threads": threads, "batches": list(batches), "rounds": rounds, "min_time_s": min_time,
            "elapsed_s": elapsed, "environment": env, "loadavg_before": env["load_average_start"],
            "loadavg_after": env["load_average_end"], "under_load": env.get("under_load"),
            "under_load_rule": env.get("under_load_rule"),
            "how": "no-grad forwards of a random batch, random weights (speed depends on the structure only); "
                   "pm_kernels.measure.time_interleaved: each round times every model once per batch size, the "
                   "order reversed every other round; median over rounds. images_per_s: wall clock; "
                   "images_per_cpu_s: per CPU second of the timing process (one thread: the wall-clock rate of an "
                   "idle core, robust to other work on the machine)",
            "entries": entries}
