"""pm_kernels.measure: interleaved timing (order, counts, wall and CPU time, spread), the environment record,
and MAC counts (traced per item, analytic from the structure)."""
import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels.measure import (Rates, analytic_macs, environment, finish_environment, forward, kept_tokens,
                                time_interleaved, traced_macs)


def _busy(n):
    return lambda: sum(range(n))


def test_rounds_are_interleaved_and_alternate():
    order = []
    cases = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    rates = time_interleaved(cases, items=4, rounds=4, calls=2, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # one warm-up call each, in order
    timed = order[3:]
    # each round: every case once (2 calls each), the order reversed every other round
    assert timed == ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["c"] * 2 + ["b"] * 2 + ["a"] * 2 + \
        ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["c"] * 2 + ["b"] * 2 + ["a"] * 2
    assert set(rates) == {"a", "b", "c"} and all(len(r.wall) == len(r.cpu) == 4 for r in rates.values())


def test_rates_wall_cpu_and_spread():
    rates = time_interleaved({"small": _busy(2000), "large": _busy(20000)}, items=8, rounds=3, min_time=0.02)
    small, large = rates["small"], rates["large"]
    assert small.median > 3 * large.median  # ten times the work: clearly fewer items per second
    for r in (small, large):
        lo, hi = r.spread
        assert 0 < lo <= r.median <= hi
        # one thread of pure Python: CPU time cannot (much) exceed wall time, so items per CPU-second >= items/s
        assert r.cpu_median >= 0.9 * r.median
        d = r.to_dict()
        assert d["images_per_s"] == r.median and d["images_per_s_runs"] == r.wall
        assert d["images_per_s_min"] == lo and d["images_per_s_max"] == hi and len(d["images_per_cpu_s_runs"]) == 3
    assert str(Rates([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])) == "2 (1-3)"


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0), "rounds"), (dict(warmup=-1), "warmup"), (dict(calls=0), "calls"),
    (dict(min_time=-1.0), "min_time"),
])
def test_bad_timing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_interleaved({"a": _busy(1)}, **kwargs)
    with pytest.raises(ValueError, match="cases"):
        time_interleaved({})


def test_forward_is_a_no_grad_call():
    model = torch.nn.Linear(3, 2)
    out = forward(model, torch.randn(4, 3))()
    assert out.shape == (4, 2) and not out.requires_grad


def test_environment_record(monkeypatch):
    loads = iter([(0.2, 0.2, 0.2), (3.0, 1.0, 1.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    env = environment("cpu", command="python x.py", batch=8)
    assert env["command"] == "python x.py" and env["batch"] == 8 and env["device"] == "cpu"
    assert env["versions"]["torch"] and env["threads"] == torch.get_num_threads() and env["date_utc"]
    assert env["load_average_start"] == [0.2, 0.2, 0.2] and "available" in env["backends"]["torch"]
    finish_environment(env)
    # quiet at the start, but at the end above the threads this run used + 0.5: another job shared the cores
    assert env["load_average_end"] == [3.0, 1.0, 1.0]
    assert env["under_load"] is (3.0 > torch.get_num_threads() + 0.5)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5).eval()


def test_traced_macs_are_per_item_and_match_the_analytic_count(vit):
    one, three = traced_macs(vit, torch.zeros(1, 3, 32, 32)), traced_macs(vit, torch.zeros(3, 3, 32, 32))
    assert one == pytest.approx(three) and one == pytest.approx(analytic_macs(vit), rel=1e-9)
    assert kept_tokens(vit) == [17] * 3
    pm = pm_kernels.compress(pm_kernels.patch_timm(vit.__class__(img_size=32, patch_size=8, embed_dim=48, depth=3,
                                                                num_heads=3, num_classes=5)),
                             torch.rand(3, 16) + 0.1, keep_rate=0.5, prune_rate=0.1)
    ks = kept_tokens(pm)
    assert all(k < 17 for k in ks)
    assert traced_macs(pm, torch.zeros(2, 3, 32, 32)) == pytest.approx(analytic_macs(pm), rel=1e-9)
    assert traced_macs(pm_kernels.optimize(pm), torch.zeros(1, 3, 32, 32)) < analytic_macs(pm)  # boundaries folded
    with pytest.raises(ValueError, match="example"):
        traced_macs(vit, torch.zeros(0, 3, 32, 32))
