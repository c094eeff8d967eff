"""Inputs of every task for the pipeline's tests: a small dense checkpoint with its scores, the arguments that
start a fresh model, and a folder dataset in the task's layout (readable or corrupt).

The command-line tests run over ``TASK_NAMES`` (every registered task); a task without an entry here fails
``tests/pipeline/test_tasks.py``, so a new task brings its test inputs with it.
"""
import os

import pytest
import torch

from pm_kernels.pipeline.tasks import TASKS

TASK_NAMES = tuple(TASKS)
every_task = pytest.mark.parametrize("task", TASK_NAMES)  # a test run once per registered task

# what starts a fresh model of each task on the embedded digits data
FRESH = {"classification": ["--model", "digits_vit"], "segmentation": []}


def task_args(task: str):
    return [] if task == "classification" else ["--task", task]


def dense_checkpoint(task: str, folder) -> dict:
    """{"dense": path, "scores": path}: an untrained 2-block model of ``task`` on the digits data (the CLI's
    behaviour is tested, not accuracy) and scores for it."""
    from pm_kernels.pipeline.io import save_checkpoint, save_scores
    torch.manual_seed(0)
    if task == "classification":
        model, meta = TASKS[task].load(None, "digits_vit", num_classes=10, extra_kwargs={"depth": 2})
    elif task == "segmentation":
        model, meta = TASKS[task].load(None, "digits_seg_vit", num_classes=11, extra_kwargs={"depth": 2})
    else:
        raise KeyError(f"no test inputs for task {task!r}: add them to tests/task_inputs.py")
    dense = save_checkpoint(model, os.path.join(str(folder), "dense.pth"), dict(meta, stage="dense"))
    scores = save_scores(torch.rand(2, 64) + 0.1, os.path.join(str(folder), "scores.pt"))
    return {"dense": dense, "scores": scores}


def folder_data(task: str, root, splits=None, images_per_class: int = 2, corrupt: bool = False) -> str:
    """A tiny dataset folder in ``task``'s layout; ``splits``: {split: class names} (classification only)."""
    from PIL import Image
    root = os.path.join(str(root))
    if task == "classification":  # ImageFolder: <split>/<class>/<i>.png, the class letter in the red channel
        for split, classes in (splits or {"train": ["a", "b"], "val": ["a", "b"]}).items():
            for name in classes:
                folder = os.path.join(root, split, name)
                os.makedirs(folder)
                for i in range(images_per_class):
                    path = os.path.join(folder, f"{i}.png")
                    if corrupt:
                        with open(path, "wb") as f:
                            f.write(b"\x89PNG\r\n\x1a\n not really a png")
                    else:
                        Image.new("RGB", (8, 8), (ord(name[0]), 0, 0)).save(path)
        return root
    if task == "segmentation":  # ADE20K: images/<split>/*.jpg, annotations/<split>/*.png (labels 0 .. 150)
        g = torch.Generator().manual_seed(0)
        for split in ("training", "validation"):
            os.makedirs(os.path.join(root, "images", split))
            os.makedirs(os.path.join(root, "annotations", split))
            for i in range(images_per_class):
                img, ann = os.path.join(root, "images", split, f"ADE_{i}.jpg"), \
                    os.path.join(root, "annotations", split, f"ADE_{i}.png")
                if corrupt:
                    for path in (img, ann):
                        with open(path, "wb") as f:
                            f.write(b"not an image")
                    continue
                pixels = (torch.rand(40, 60, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(img)
                Image.fromarray(torch.randint(0, 151, (40, 60), generator=g).to(torch.uint8).numpy()).save(ann)
        return root
    raise KeyError(f"no test inputs for task {task!r}: add them to tests/task_inputs.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``inputs(task)``: a 2-block dense checkpoint of ``task`` and its scores (``dense_checkpoint``), made once per
    test module and task. (A fixture here, imported by the modules that use it: a second conftest.py would shadow
    tests/conftest.py's module name.)"""
    made = {}

    def get(task):
        if task not in made:
            made[task] = dense_checkpoint(task, tmp_path_factory.mktemp(task))
        return made[task]
    return get
