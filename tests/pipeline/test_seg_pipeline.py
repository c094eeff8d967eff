"""The segmentation pipeline: embedded digits canvases, the ADE20K-layout reader, mIoU, and the CLI with
``--task segmentation`` (demo, and the subcommands chained on a tiny budget)."""
import json
import os

import pytest
import torch

from pm_kernels.cli import main
from pm_kernels.pipeline.io import PipelineError
from pm_kernels.pipeline.tasks.segmentation import confusion_matrix, miou_from_confusion
from pm_kernels.pipeline.tasks.segmentation_data import ADE20K, ade20k, digits_segmentation


@pytest.fixture(scope="module")
def canvases():
    return digits_segmentation(img_size=32, n_train=40, n_val=12)


def test_digits_canvases_are_fixed_and_labelled_where_ink_is(canvases):
    again = digits_segmentation(img_size=32, n_train=40, n_val=12)
    assert torch.equal(canvases.train.images, again.train.images) and torch.equal(canvases.test.labels,
                                                                                  again.test.labels)
    assert canvases.num_classes == 11 and canvases.in_chans == 1 and len(canvases.train) == 40
    x, y = canvases.train[0]
    assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    images, labels = canvases.train.images, canvases.train.labels
    assert labels.min() >= 0 and labels.max() <= 10 and len(labels.unique()) > 3
    ink = images[:, 0] > -1.0 + 2 * 0.3  # intensity above the ink threshold (images are 2·v − 1)
    assert torch.equal(labels > 0, ink), "a pixel is a digit's class exactly where a scan has ink"


def test_digits_canvases_with_a_noisy_background_keep_their_labels(canvases):
    noisy = digits_segmentation(img_size=32, n_train=40, n_val=12, background_noise=0.25)
    images, labels = noisy.train.images, noisy.train.labels
    background = images[:, 0][labels == 0]
    assert background.min() >= -1.0 and background.max() < -1.0 + 2 * 0.25 and background.std() > 0.05
    assert torch.equal(labels > 0, images[:, 0] > -1.0 + 2 * 0.3), "labels still follow the ink"
    assert labels.sum() > 0
    with pytest.raises(ValueError, match="background_noise"):
        digits_segmentation(img_size=32, n_train=40, n_val=12, background_noise=0.3)


def test_miou_by_hand():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 1]])
    target = torch.tensor([[0, 1, 1, 1], [2, 2, 255, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 2]]
    m = miou_from_confusion(conf)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 2 / 2 = 1
    assert m["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7)
    with pytest.raises(PipelineError, match="labels"):
        confusion_matrix(pred, torch.full_like(target, 7), 3)


def _ade_folder(root, n_train=2, n_val=1):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for i in range(n):
            h, w = 40 + 8 * i, 60
            img = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            ann = torch.randint(0, 151, (h, w), generator=g).to(torch.uint8)
            ann[:, :5] = 0
            Image.fromarray(img).save(root / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(ann.numpy()).save(root / "annotations" / split / f"ADE_{split}_{i}.png")
    return root


def test_ade20k_layout(tmp_path):
    from PIL import Image
    root = _ade_folder(tmp_path / "ADEChallengeData2016")
    data = ade20k(str(tmp_path), crop_size=32)  # the folder holding ADEChallengeData2016 works too
    assert data.num_classes == 150 and len(data.train) == 2 and len(data.test) == 1
    ann = torch.from_numpy(__import__("numpy").array(Image.open(root / "annotations" / "validation" /
                                                                 "ADE_validation_0.png"))).long()
    img, labels = data.test[0]
    assert img.shape == (3, 32, 48) and labels.shape == (32, 48)  # shorter side → 32, labels nearest
    raw = ann[:, :5]
    assert bool((labels[:, :2] == 255).all()) and raw.max() == 0, "label 0 ('other') is ignored (255)"
    assert labels[labels != 255].max() <= 149 and labels.min() >= 0
    torch.manual_seed(0)
    for _ in range(3):
        x, y = data.train[1]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        assert bool(((y >= 0) & (y < 150) | (y == 255)).all())
    small = ADE20K(str(root), "training", crop_size=200, train=True, scale_range=(0.5, 0.5))  # 100 x 150 image
    x, y = small[0]
    assert x.shape == (3, 200, 200) and bool((y[100:] == 255).all()), "padding is labelled ignore"
    assert int((y == 255).sum()) >= 200 * 200 - 100 * 150 and bool((x[:, 100:] == 0).all())


def test_ade20k_layout_errors(tmp_path):
    with pytest.raises(PipelineError, match="no such folder"):
        ade20k(str(tmp_path / "missing"))
    root = _ade_folder(tmp_path / "ade")
    os.remove(root / "annotations" / "training" / "ADE_training_1.png")
    with pytest.raises(PipelineError, match="no annotation"):
        ade20k(str(root))
    with pytest.raises(PipelineError, match="images/training|no folder"):
        ade20k(str(tmp_path))


def test_demo_quick_writes_results_and_pictures(tmp_path, capsys):
    out = tmp_path / "seg_demo"
    main(["demo", "--task", "segmentation", "--quick", "--out", str(out), "--quiet", "--threads", "1"])
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "segmentation"
    names = [r["model"] for r in res["rows"]]
    assert names == ["dense", "PM keep 0.7"]
    for r in res["rows"]:
        for key in ("miou", "pixel_acc", "gmacs", "images_per_s", "speedup", "mac_ratio"):
            assert isinstance(r[key], float) and r[key] >= 0, key
    pm = res["rows"][1]
    assert pm["keep"] < 1.0 and pm["gmacs"] < res["rows"][0]["gmacs"]
    for f in ("predictions.png", "structure_keep0.7.png", "dense.pth", "pm_keep0.7.pth", "scores.pt"):
        assert (out / f).stat().st_size > 0, f


def test_subcommands_chain_with_task_segmentation(tmp_path, capsys):
    common = ["--task", "segmentation", "--quiet", "--threads", "1", "--img-size", "32", "--batch-size", "16"]
    main(["train", *common, "--max-iters", "3", "--decoder", "linear", "--out", str(tmp_path / "dense.pth")])
    main(["calibrate", *common, "--checkpoint", str(tmp_path / "dense.pth"), "--iters", "2",
          "--out", str(tmp_path / "scores.pt")])
    main(["compress", *common[:7], "--checkpoint", str(tmp_path / "dense.pth"), "--scores",
          str(tmp_path / "scores.pt"), "--keep-rate", "0.5", "--layers", "0", "2", "--out", str(tmp_path / "pm.pth")])
    info = json.loads((tmp_path / "pm.json").read_text())
    assert info["thresholds"] == "per_layer" and info["prune_rate"] == 0.0
    # the output rules of the classification commands: a checkpoint whose results JSON would overwrite it
    with pytest.raises(SystemExit) as exc:
        main(["compress", *common[:7], "--checkpoint", str(tmp_path / "dense.pth"), "--scores",
              str(tmp_path / "scores.pt"), "--out", str(tmp_path / "clash.json")])
    assert exc.value.code == 2 and "would overwrite it" in capsys.readouterr().err
    assert not (tmp_path / "clash.json").exists()
    assert info["K"][1] == info["N"] and info["K"][0] == 64 // 2 + 1, "layer 1 dense, layers 0, 2 at keep 0.5"
    main(["finetune", *common, "--checkpoint", str(tmp_path / "pm.pth"), "--teacher", str(tmp_path / "dense.pth"),
          "--max-iters", "2", "--out", str(tmp_path / "pm_ft.pth")])
    main(["evaluate", *common, "--dense", str(tmp_path / "dense.pth"), "--checkpoint", str(tmp_path / "pm_ft.pth"),
          "--repeats", "1", "--out-dir", str(tmp_path / "eval")])
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "pm_ft"] and rows[1]["gmacs"] < rows[0]["gmacs"]
    main(["visualize", *common, "--checkpoint", str(tmp_path / "pm_ft.pth"), "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "s_prediction.png").stat().st_size > 0


@pytest.mark.parametrize("argv,match", [
    (["compress", "--checkpoint", "x.pth", "--scores", "s.pt", "--layers", "1", "--out", "o.pth"], "--layers"),
    (["train", "--decoder", "mask", "--model", "digits_vit", "--out", "o.pth"], "--decoder"),
])
def test_segmentation_options_refused_without_the_task(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
