"""bench/peers_digits.py: the pieces that do not need the (minutes-long) training run."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: bench

from bench import peers_digits as pdg  # noqa: E402
from bench.common import plain_vit  # noqa: E402
from bench.peers import dims_from_model, match_evit_keep_rate, match_tome_r, patch_evit, patch_tome  # noqa: E402
from bench.peers.flops import evit_token_counts, tome_token_counts  # noqa: E402
from pm_kernels.measure import analytic_macs  # noqa: E402
from pm_kernels.pipeline.families import DIGITS_VIT, DIGITS_VIT_KWARGS  # noqa: E402
from pm_kernels.pipeline.model import build_model  # noqa: E402


def test_plain_vit_computes_the_dense_pm_model():
    torch.manual_seed(0)
    pm = build_model(DIGITS_VIT).eval()
    vit = plain_vit(pm, DIGITS_VIT_KWARGS)
    x = torch.randn(3, *pdg.INPUT)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), pm(x), atol=1e-4, rtol=1e-4)
    assert type(vit.blocks[0]).__name__ == "Block"   # ToMe / EViT need plain timm blocks
    # ToMe and EViT patch it: removing nothing they compute the same model; removing tokens they follow the
    # schedules the FLOP matching counts with.
    n, depth = vit.patch_embed.num_patches + 1, len(vit.blocks)
    with torch.no_grad():
        expected = pm(x)
        torch.testing.assert_close(patch_tome(plain_vit(pm, DIGITS_VIT_KWARGS), 0)(x), expected,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(patch_evit(plain_vit(pm, DIGITS_VIT_KWARGS), 1.0, [1, 2, 3])(x), expected,
                                   atol=1e-4, rtol=1e-4)
        tome = patch_tome(plain_vit(pm, DIGITS_VIT_KWARGS), 5)
        evit = patch_evit(plain_vit(pm, DIGITS_VIT_KWARGS), 0.5, [1, 2, 3])
        assert tome(x).shape == evit(x).shape == expected.shape
    assert tome._tome_info["tokens"] == [m for _, m in tome_token_counts(n, depth, 5)]
    assert evit._evit_info["tokens"] == [m for _, m in evit_token_counts(n, depth, 0.5, [1, 2, 3])]


def test_matching_lands_near_pm(tmp_path):
    from pm_kernels import compress
    torch.manual_seed(0)
    pm = build_model(DIGITS_VIT).eval()
    vit = plain_vit(pm, DIGITS_VIT_KWARGS)
    d = dims_from_model(vit)
    compress(pm, torch.rand(4, 64) + 1e-3, keep_rate=0.6, prune_rate=0.1)
    target = analytic_macs(pm) / 1e9
    _, g_tome = match_tome_r(d, target)
    _, g_evit = match_evit_keep_rate(d, target, [1, 2, 3])
    assert abs(g_tome - target) / target < 0.03 and abs(g_evit - target) / target < 0.03

    rows = [dict(method="dense", keep_rate=None, gmacs=0.0107, top1=98.0, setting="plain"),
            dict(method="PM", keep_rate=0.6, gmacs=target, top1=97.5, setting="K", top1_before_finetune=90.0),
            dict(method="ToMe", keep_rate=0.6, gmacs=g_tome, top1=97.0, setting="r"),
            dict(method="EViT", keep_rate=0.6, gmacs=g_evit, top1=96.0, setting="k")]
    for r in rows:
        r.update(images_per_s=100.0, delta_top1=r["top1"] - 98.0, speedup=1.0)
    table = pdg.format_rows(rows)
    assert len(table.splitlines()) == 6 and "ToMe" in table
    result = {"rows": rows, "evit_locations": [1, 2, 3], "n_test": 450, "config": {"seed": 0, "ft_epochs": 4.0},
              "env": {"cpu_name": "cpu", "threads": 1, "loadavg_start": [1.0], "cpu_count": 2}}
    pdg.plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def _seed_result(seed, top1):
    rows = [{"method": "dense", "keep_rate": None, "top1": top1["dense"]}]
    rows += [{"method": m, "keep_rate": 0.6, "top1": top1[m]} for m in ("PM", "ToMe", "EViT")]
    best = max(top1["ToMe"], top1["EViT"])
    return {"config": {"seed": seed}, "n_test": 450, "rows": rows, "date": "d", "env": {"versions": {}},
            "target_PM_at_least_as_accurate": {"keep 0.6": {"PM_minus_best_peer_images":
                                                            round((top1["PM"] - best) * 4.5)}}}


def test_seed_summary_statistics():
    from bench.peers_digits_summary import summarize
    a = _seed_result(0, {"dense": 98.0, "PM": 96.0, "ToMe": 97.0, "EViT": 95.0})
    b = _seed_result(1, {"dense": 96.0, "PM": 98.0, "ToMe": 97.0, "EViT": 98.0})
    s = summarize([a, b])
    assert s["top1"]["PM keep 0.6"]["mean"] == pytest.approx(97.0)
    assert s["top1"]["PM keep 0.6"]["std"] == pytest.approx(2 ** 0.5)
    assert s["top1"]["ToMe keep 0.6"]["std"] == 0.0
    assert s["top1"]["dense"]["top1_per_seed"] == [98.0, 96.0]
    gap = s["PM_vs_best_peer"]["keep 0.6"]
    assert gap["PM_minus_best_peer_images_per_seed"] == [-4, 0]
    assert gap["seeds_where_PM_at_least_as_accurate"] == 1
    assert gap["PM_minus_ToMe_points"]["per_seed"] == [-1.0, 1.0]
    assert gap["PM_minus_EViT_points"]["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="each seed once"):
        summarize([a, a])
