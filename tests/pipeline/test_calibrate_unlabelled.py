"""``pm-kernels calibrate`` on images without labels (issue 25): a folder of images with no class sub-folders is
scored by a label-free objective, for every task; ``--objective`` picks one (and strips an ImageFolder's labels
for a label-free one); what cannot work ends with one ``error:`` line, exit 2."""
import os

import pytest
import torch
from PIL import Image

from pm_kernels.cli import OBJECTIVE_NAMES, main
from pm_kernels.objectives import OBJECTIVES
from pm_kernels.pipeline.io import load_scores, save_checkpoint
from pm_kernels.pipeline.tasks import TASKS
from task_inputs import dense_checkpoint, every_task, folder_data, task_args

MODEL = {"classification": ("digits_vit", 10), "segmentation": ("digits_seg_vit", 11)}


def rgb_checkpoint(task: str, folder) -> str:
    """An untrained 2-block, 3-channel model of ``task`` (a folder of images is read as RGB)."""
    torch.manual_seed(0)
    name, classes = MODEL[task]
    model, meta = TASKS[task].load(None, name, num_classes=classes, extra_kwargs={"depth": 2, "in_chans": 3})
    return save_checkpoint(model, os.path.join(str(folder), "dense_rgb.pth"), dict(meta, stage="dense"))


def flat_images(root, n=20) -> str:
    """``root/<i>.png``: images with no class sub-folders."""
    os.makedirs(root)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(12, 10, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(root, f"{i}.png"))
    return str(root)


def calibrate(task, checkpoint, data, out, *extra):
    main(["calibrate", *task_args(task), "--checkpoint", checkpoint, "--data", data, "--iters", "2",
          "--batch-size", "8", "--out", str(out), "--quiet", *extra])
    return load_scores(str(out))


def test_the_cli_knows_every_objective():
    assert OBJECTIVE_NAMES == tuple(OBJECTIVES)


@every_task
@pytest.mark.parametrize("objective", [None, "kmeans"])
def test_a_folder_of_images_without_classes_is_calibrated(tmp_path, task, objective):
    checkpoint = rgb_checkpoint(task, tmp_path)
    data = flat_images(tmp_path / "images")
    loaded = calibrate(task, checkpoint, data, tmp_path / "scores.pt", *(["--objective", objective] if objective
                                                                         else []))
    scores = loaded["scores"]
    assert scores.dtype == torch.float32 and scores.shape == (2, 64)
    assert torch.isfinite(scores).all() and (scores.sum(dim=1) > 0).all()
    assert loaded["meta"]["objective"] == (objective or "default without labels")
    assert loaded["meta"]["task"] == task


def test_labels_of_an_image_folder_are_dropped_for_a_label_free_objective(tmp_path):
    checkpoint = rgb_checkpoint("classification", tmp_path)
    data = folder_data("classification", tmp_path / "data", images_per_class=8)
    labelled = calibrate("classification", checkpoint, data, tmp_path / "labels.pt")["scores"]
    pseudo = calibrate("classification", checkpoint, data, tmp_path / "pseudo.pt", "--objective", "pseudo_labels")
    assert pseudo["meta"]["objective"] == "pseudo_labels"
    assert torch.isfinite(pseudo["scores"]).all() and not torch.equal(pseudo["scores"], labelled)


@pytest.mark.parametrize("case, message", [
    ("labels on images alone", "calibrate: batches: batch 0 is images alone, but objective 'labels' needs"),
    ("no checkpoint", "checkpoint: a folder of images without class sub-folders calibrates a trained model"),
    ("a 1-channel model", "a folder of images is read as RGB, the model takes 1 channels"),
    ("too few images for k-means", "calibrate: batches: k-means with clusters=16 needs at least 16"),
])
def test_what_cannot_work_is_one_line(tmp_path, capsys, case, message):
    data = flat_images(tmp_path / "images", n=4 if case.startswith("too few") else 20)
    args = ["calibrate", "--data", data, "--iters", "2", "--batch-size", "8", "--out", str(tmp_path / "s.pt"),
            "--quiet"]
    if case == "labels on images alone":
        args += ["--checkpoint", rgb_checkpoint("classification", tmp_path), "--objective", "labels"]
    elif case == "a 1-channel model":
        args += ["--checkpoint", dense_checkpoint("classification", tmp_path)["dense"]]
    elif case.startswith("too few"):
        args += ["--checkpoint", rgb_checkpoint("classification", tmp_path), "--objective", "kmeans"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.pt").exists()
