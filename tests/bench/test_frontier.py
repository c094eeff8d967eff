"""bench/pareto.py (the digits frontier): phases on a tiny budget, the statistics, the PM variants."""
import copy
import json
import os
import sys

import pytest
import torch

import pm_kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: bench

from bench import pareto  # noqa: E402
from bench.frontier import accuracy as acc  # noqa: E402
from bench.frontier.report import _interp, summarize  # noqa: E402
from bench.frontier.variants import VARIANTS, timed_as, train_config, variant_structure  # noqa: E402
from pm_kernels import compress, search_structure  # noqa: E402
from pm_kernels.pipeline.data import load_data  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, param_groups, train  # noqa: E402
from pm_kernels.pipeline.families import DIGITS_VIT  # noqa: E402
from pm_kernels.pipeline.model import build_model  # noqa: E402


_REAL_RECIPE = acc.recipe


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared CPU: extra OpenMP threads only spin (6x slower measured under load)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_recipe(seed):
    rc = _REAL_RECIPE(seed)
    rc["dense"].epochs = 0.1
    rc["finetune"].epochs = 0.1
    return rc


def test_variants_fine_tune_with_the_library_options():
    """A variant is the library's train() with its options: the baseline is the recipe itself, M and R's own lr
    (mr_lr10) and own warm-up (mr_warmup) each change the result; a bad warm-up is refused."""
    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    dense = build_model(DIGITS_VIT).eval()
    teacher = copy.deepcopy(dense)
    pm = compress(copy.deepcopy(dense), torch.rand(4, 64) + 1e-3, keep_rate=0.5)
    cfg = TrainConfig(epochs=0.1, batch_size=32, lr=5e-4, seed=3, progress=False)
    assert train_config(VARIANTS["baseline"], cfg) == cfg
    trained = {}
    for name in ("baseline", "mr_lr10", "mr_warmup"):
        trained[name] = copy.deepcopy(pm)
        train(trained[name], data, train_config(VARIANTS[name], cfg), teacher=teacher, device="cpu")
    assert not torch.equal(trained["baseline"].blocks[0].M, pm.blocks[0].M)              # it trained
    for name in ("mr_lr10", "mr_warmup"):
        assert not torch.allclose(trained[name].blocks[0].M, trained["baseline"].blocks[0].M), name
    with pytest.raises(ValueError, match="mr_warmup_iters"):
        train(copy.deepcopy(pm), data, TrainConfig(**dict(cfg.__dict__, mr_warmup_iters=-1)), teacher=teacher)


def test_mr_lr_mult_groups_and_bad_values():
    model = build_model(DIGITS_VIT, dict(depth=2))
    model = pm_kernels.compress(model, torch.rand(2, 64) + 1e-3, keep_rate=0.5)  # M and R are parameters
    default = param_groups(model, 1e-4, 1e-3)
    assert len(default) == 2                                          # SPEC §5: one lr, M and R in the decay group
    groups = param_groups(model, 1e-4, 1e-3, mr_lr_mult=10)
    mr = {id(b.M) for b in model.blocks} | {id(b.R) for b in model.blocks}
    assert {id(p) for p in groups[2]["params"]} == mr and groups[2]["lr"] == pytest.approx(1e-3)
    assert not mr & {id(p) for p in groups[0]["params"] + groups[1]["params"]}
    assert groups[2]["weight_decay"] == groups[0]["weight_decay"] == 1e-3
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="mr_lr_mult"):
            param_groups(model, 1e-4, 1e-3, mr_lr_mult=bad)


def test_variant_structures():
    torch.manual_seed(1)
    scores = torch.rand(4, 64) + 1e-3
    base = variant_structure(scores, 0.5, VARIANTS["baseline"])
    lib = search_structure(scores, keep_rate=0.5, prune_rate=0.1, depth_discount=0.025)
    assert all(torch.equal(x.centres, y.centres) and torch.equal(x.pruned, y.pruned) for x, y in zip(base, lib))
    per_layer = variant_structure(scores, 0.5, VARIANTS["per_layer"])
    assert [s.keep for s in per_layer] == [33] * 4 and [int(s.pruned.sum()) for s in per_layer] == [6] * 4
    for name in ("norm_none", "norm_max", "norm_rank", "norm_l1"):
        st = variant_structure(scores, 0.5, VARIANTS[name])
        assert sum(int(s.centres.sum()) for s in st) == 32 * 4, name      # int(64·0.5)·L centres in all
    half = variant_structure(scores, 0.4, VARIANTS["prune_half"])
    assert sum(int(s.pruned.sum()) for s in half) == int(64 * 0.3) * 4   # prune = (1 - 0.4) / 2


def test_timed_as():
    assert timed_as(VARIANTS["mr_lr10"]) == timed_as(VARIANTS["mr_warmup"]) == "baseline"   # same structures
    assert timed_as(VARIANTS["mr_lr10_prune_half"]) == "mr_lr10_prune_half"
    assert timed_as(VARIANTS["calib100"]) == "calib100" and timed_as(VARIANTS["dd0.2"]) == "dd0.2"


def test_interp():
    assert _interp([1, 3], [10, 30], 2) == pytest.approx(20)
    assert _interp([3, 1], [30, 10], 1.5) == pytest.approx(15)
    assert _interp([1, 3], [10, 30], 4) is None


def test_phases_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(acc, "recipe", _tiny_recipe)
    results, work = str(tmp_path / "res"), str(tmp_path / "work")
    calls = []
    real_train = acc.train
    monkeypatch.setattr(acc, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    base = ["--results", results]
    pareto.main(base + ["accuracy", "--seeds", "0-1", "--keeps", "0.5", "--work", work])
    n_first = len(calls)
    assert n_first == 2 * (1 + 3)                # per seed: dense + PM, ToMe, EViT
    pareto.main(base + ["accuracy", "--seeds", "0-1", "--keeps", "0.5", "--work", work])
    assert len(calls) == n_first                 # resumed: nothing redone
    pareto.main(base + ["accuracy", "--seeds", "0-1", "--keeps", "0.5", "--work", work, "--variant", "mr_lr10"])
    assert len(calls) == n_first + 2             # dense cached; per seed one PM row, through train() + options
    seed0 = json.load(open(os.path.join(results, "seed0.json")))
    assert set(seed0["rows"]) == {"dense", "PM keep 0.5", "ToMe keep 0.5", "EViT keep 0.5"}
    pm = seed0["rows"]["PM keep 0.5"]
    assert abs(pm["top1_optimized"] - pm["top1"]) < 0.5     # optimize computes the same model
    tome = seed0["rows"]["ToMe keep 0.5"]
    assert abs(tome["gmacs"] - pm["gmacs"]) / pm["gmacs"] < 0.03

    screened = pareto.main(base + ["screen", "--seeds", "0-1", "--keeps", "0.5", "--work", work,
                                   "--variants", "baseline,per_layer"])
    assert screened["baseline"]["keep 0.5"]["top1"] == [json.load(open(os.path.join(results, f"seed{s}.json")))[
        "rows"]["PM keep 0.5"]["top1_before_finetune"] for s in (0, 1)]       # same model as the accuracy phase
    assert screened["per_layer"]["keep 0.5"]["K"][0] == [33] * 4

    pareto.main(base + ["timing", "--rounds", "1", "--min-time", "0.005"])
    timing = json.load(open(os.path.join(results, "timing_CPU.json")))
    # dense + per seed, keep: PM eager, PM, ToMe, EViT; mr_lr10 has the baseline's structures: not timed again
    assert len(timing["entries"]) == 1 + 2 * 4
    assert all(e["images_per_s_b1"] > 0 and e["images_per_s_b8"] > 0 for e in timing["entries"])
    # one thread: CPU time cannot be (much) less than wall time, so images per CPU second >= images/s
    assert all(e["images_per_cpu_s_b8"] >= 0.9 * e["images_per_s_b8"] for e in timing["entries"])
    out = str(tmp_path / "p.json")
    result = pareto.main(base + ["report", "--out", out])
    front = result["frontier"]
    assert front["top1"]["PM keep 0.5"]["top1"]["n"] == 2
    assert set(front["matched_gmacs"]["keep 0.5"]) == {"PM_minus_ToMe", "PM_minus_EViT"}
    assert "ToMe keep 0.5" in front["equal_speed"]["batch 8"]
    assert "EViT keep 0.5" in front["equal_speed_cpu_time"]["batch 1"]
    mr = result["variants"]["mr_lr10"]
    assert mr["vs_baseline_PM"]["keep 0.5"]["n"] == 2
    assert mr["top1"]["PM keep 0.5"]["images_per_s_b8"] == front["top1"]["PM keep 0.5"]["images_per_s_b8"]
    assert "ToMe keep 0.5" in mr["equal_speed"]["batch 8"]
    assert os.path.getsize(str(tmp_path / "p.png")) > 1000 and os.path.getsize(str(tmp_path / "p_variants.png")) > 1000


def test_equal_speed_statistics():
    def files(pm, tome):
        out = []
        for seed, (p, t) in enumerate(zip(pm, tome)):
            rows = {"dense": {"method": "dense", "keep_rate": None, "top1": 99.0, "gmacs": 1.0}}
            for keep, a, b in zip((0.4, 0.6), p, t):
                rows[f"PM keep {keep:g}"] = {"method": "PM", "keep_rate": keep, "top1": a, "gmacs": keep,
                                             "K_per_layer": [1], "prune_rate": 0.1}
                rows[f"ToMe keep {keep:g}"] = {"method": "ToMe", "keep_rate": keep, "top1": b, "gmacs": keep}
            out.append({"seed": seed, "rows": rows})
        return out
    seed_files = files([(90, 96), (92, 98)], [(93, 95), (95, 97)])
    entries = [{"variant": "baseline", "name": "dense", "keep_rate": None, "seed": None, "images_per_s_b8": 100.0}]
    slow = {"variant": "baseline", "name": "EViT", "keep_rate": 0.4, "images_per_s_b8": 90.0}   # slower than dense
    entries += [dict(slow, seed=0), dict(slow, seed=1)]
    for f, t in zip(seed_files, (97.0, 100.0)):
        f["rows"]["EViT keep 0.4"] = {"method": "EViT", "keep_rate": 0.4, "top1": t, "gmacs": 0.4}
    for seed in (0, 1):
        entries += [{"variant": "baseline", "name": "PM", "keep_rate": 0.4, "seed": seed, "images_per_s_b8": 300.0},
                    {"variant": "baseline", "name": "PM", "keep_rate": 0.6, "seed": seed, "images_per_s_b8": 200.0},
                    {"variant": "baseline", "name": "ToMe", "keep_rate": 0.4, "seed": seed, "images_per_s_b8": 250.0},
                    {"variant": "baseline", "name": "ToMe", "keep_rate": 0.6, "seed": seed, "images_per_s_b8": 350.0}]
    s = summarize(seed_files, {"batches": [8], "entries": entries})
    assert s["matched_gmacs"]["keep 0.4"]["PM_minus_ToMe"]["per_seed"] == [-3, -3]
    es = s["equal_speed"]["batch 8"]
    # ToMe 0.4 at 250 img/s: the nearest PM model not slower is keep 0.4 (300): 90 − 93, 92 − 95; along the
    # curve, halfway between keep 0.6 (200) and 0.4 (300): 93 − 93, 95 − 95
    assert es["ToMe keep 0.4"]["pm_match"] == "PM keep 0.4"
    assert es["ToMe keep 0.4"]["per_seed"] == pytest.approx([-3.0, -3.0])
    assert es["ToMe keep 0.4"]["interpolated"]["per_seed"] == pytest.approx([0.0, 0.0])
    assert "outside" in es["ToMe keep 0.6"]     # faster than every PM model
    # EViT slower than every PM model: its counterpart is the slowest PM model, keep 0.6 (96 − 97, 98 − 100);
    # the dense model (not fine-tuned) is not a point of PM's curve
    assert es["EViT keep 0.4"]["pm_match"] == "PM keep 0.6" and es["EViT keep 0.4"]["per_seed"] == [-1.0, -2.0]
    assert "interpolated" not in es["EViT keep 0.4"]
