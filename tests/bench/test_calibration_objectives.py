"""bench/calibration_objectives.py: its measures (Spearman, IoU, the paired summary) and a quick end-to-end run."""
import json
import os
import sys

import pytest
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: bench

from bench import calibration_objectives as co  # noqa: E402


def test_spearman_is_the_rank_correlation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, generator=g), torch.rand(64, generator=g)
    assert co.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert co.spearman(a, a.exp()) == pytest.approx(1.0)   # ranks only
    assert co.spearman(a, -a) == pytest.approx(-1.0)


def test_iou_of_two_sets():
    a = torch.tensor([True, True, False, False])
    assert co.iou(a, torch.tensor([True, False, True, False])) == pytest.approx(1 / 3)
    assert co.iou(~a & a, ~a & a) is None  # two empty sets: no overlap to speak of


def test_summary_pairs_each_variant_with_labels_of_the_same_seed():
    def seed_file(seed, labels, kmeans):
        row = dict(spearman_per_layer=[1.0, 1.0], centre_iou_per_layer=[1.0, 1.0], pruned_iou=1.0, seconds=1.0,
                   images=640, metric_before_finetune=labels, metric=labels)
        other = dict(row, spearman_per_layer=[0.5, 0.7], metric_before_finetune=kmeans, metric=kmeans)
        return {"seed": seed, "variants": {"labels": row, "kmeans_pooled": other}}

    summary = co.summarize([seed_file(0, 90.0, 91.0), seed_file(1, 80.0, 79.0)])
    k = summary["kmeans_pooled"]
    assert k["after_finetune_minus_labels"]["mean"] == pytest.approx(0.0)   # +1 and -1, paired by seed
    assert k["after_finetune_minus_labels"]["std"] == pytest.approx(2 ** 0.5)
    assert k["spearman"]["mean"] == pytest.approx(0.6) and k["spearman_per_layer"] == pytest.approx([0.5, 0.7])


def test_quick_run_and_report(tmp_path):
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    args = ["--quick", "--work", work, "--out", out]
    co.main(args + ["run", "--task", "segmentation", "--seeds", "0", "--variants", "labels,random,kmeans_pooled",
                    "--finetune", "kmeans_pooled"])
    saved = json.load(open(os.path.join(out, "segmentation_seed0.json")))
    assert saved["labels_vs_demo_scores_max_rel_diff"] == 0.0   # the objective path reproduces the demo's scores
    assert set(saved["variants"]) == {"labels", "random", "kmeans_pooled"}
    assert "metric" in saved["variants"]["kmeans_pooled"] and "metric" not in saved["variants"]["random"]
    report = co.main(args + ["report"])
    assert "kmeans_pooled" in report["tasks"]["segmentation"]["markdown"]
