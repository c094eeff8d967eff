"""Folder data: an ImageFolder's one class map, from the training split, labels both splits; for every task, a
folder of its layout whose images do not decode ends the run with one line before any work, and an image that
stops decoding mid-run is one error."""
import warnings

import pytest
import torch
from PIL import Image

from pm_kernels.cli import main
from pm_kernels.pipeline.data import load_data
from pm_kernels.pipeline.io import PipelineError, PipelineWarning
from pm_kernels.pipeline.tasks import TASKS
from task_inputs import TASK_NAMES, folder_data, task_args


def _folder(root, split_classes, images_per_class=2, corrupt=False):
    """``root/<split>/<class>/<i>.png``: 8×8 images whose red channel encodes the class name's letter."""
    for split, classes in split_classes.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(images_per_class):
                path = folder / f"{i}.png"
                if corrupt:
                    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
                else:
                    Image.new("RGB", (8, 8), (ord(name[0]), 0, 0)).save(path)
    return str(root)


def _labels(data, split):
    """{(class letter, label)} of the validation split, the letter decoded from the image itself (no
    augmentation there: the red value survives resize and normalisation)."""
    found = set()
    for i in range(len(split)):
        image, target = split[i]
        red = image[0] * data.std[0] + data.mean[0]
        found.add((chr(int(torch.mode((red * 255).round().flatten()).values)), int(target)))
    return sorted(found)


def test_val_labels_follow_the_training_class_map(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "c"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(root, img_size=8)
    assert data.num_classes == 3
    assert _labels(data, data.test) == [("a", 0), ("c", 2)]  # c is class 2 in both splits (was 1 in val)
    _, target = data.test[len(data.test) - 1]
    assert target == 2
    said = [str(w.message) for w in caught if issubclass(w.category, PipelineWarning)]
    assert len(said) == 1 and "1 of the 3 training classes have no validation images (b)" in said[0]


def test_val_class_absent_from_training_is_an_error(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b"], "val": ["a", "d"]})
    with pytest.raises(PipelineError, match=r"validation class\(es\) d are not in the training split"):
        load_data(root, img_size=8)


def test_same_classes_no_warning(tmp_path):
    root = _folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PipelineWarning)
        data = load_data(root, img_size=8)
    assert _labels(data, data.test) == [("a", 0), ("b", 1)]


def test_one_training_class_is_said(tmp_path):
    root = _folder(tmp_path, {"train": ["only"], "val": ["only"]})
    with pytest.warns(PipelineWarning, match="one class in the training split"):
        load_data(root, img_size=8)


def test_cli_prints_the_warning_as_one_line(tmp_path, capsys):
    """The CLI shows the pipeline's warnings as one ``warning:`` line (here, before the run's own error)."""
    root = _folder(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "c"]})
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "digits_vit", "--data", root, "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[0].startswith("pm-kernels calibrate: warning: data") and "(b)" in err[0]
    assert err[1].startswith("pm-kernels calibrate: error: output") and "results JSON" in err[1]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_corrupt_images_are_one_error_line(tmp_path, capsys, task):
    """Every image corrupt: exit 2 and one line before any training (it was a PIL traceback, exit 1)."""
    root = folder_data(task, tmp_path / "data", corrupt=True)
    with pytest.raises(SystemExit) as exc:
        main(["train", *task_args(task), "--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", root,
              "--max-iters", "1", "--batch-size", "2", "--quiet", "--out", str(tmp_path / "o.pth")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert "can" in lines[0] and "read" in lines[0] and "Traceback" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def _images(data):
    """The image files of a split (either task's layout)."""
    if hasattr(data, "samples"):
        return [path for path, _ in data.samples]
    return [image for image, _ in data.pairs]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_an_unreadable_image_mid_run_is_one_error(tmp_path, task):
    """An image broken after the checks at load: a PipelineError naming the file or folder (for an ImageFolder,
    timm's error after its retries), and the untouched split still reads."""
    root = folder_data(task, tmp_path, splits={"train": ["a"], "val": ["a"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineWarning)
        data = TASKS[task].load_data(root, img_size=8)
    for path in _images(data.train):
        with open(path, "wb") as f:
            f.write(b"broken after the check")
    with pytest.raises(PipelineError, match="cannot (be )?read"):
        data.train[0]
    assert isinstance(data.test[0][0], torch.Tensor)  # the untouched split still reads
