"""Issue 24 (hardening, round 2), inputs: one ``error:`` line (or a ``warning:`` line where the run still means
something) instead of a traceback, a crash, a huge allocation or a silent wrong result.

- numbers: bounds that follow from the machine and the model, checked before any allocation (item 4);
- ADE20K masks read as stored; images too large, as stored or as resized, refused (items 4, 6);
- a checkpoint with compressed records refused before it is inflated (item 8);
- silent acceptances (item 11) and the task named in the messages (item 13).
"""
import os
import struct
import zipfile
import zlib

import pytest
import torch
from PIL import Image

from cli_subprocess import error_lines, run_cli
from pm_kernels.cli import main
from pm_kernels.pipeline.io import PipelineError, save_checkpoint, save_scores
from pm_kernels.pipeline.tasks import TASKS
from pm_kernels.pipeline.tasks.segmentation_data import ade20k
from task_inputs import FRESH, every_task, folder_data, inputs, task_args  # noqa: F401  (inputs: a fixture)


def _run(capsys, argv):
    """(exit status, stderr lines) of ``main(argv)``."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, error_lines(capsys.readouterr().err)


def _error(capsys, argv) -> str:
    code, lines = _run(capsys, argv)
    assert code == 2 and len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


# ---------------------------------------------------------------- numbers (4)

def test_threads_beyond_the_machine_are_one_line(tmp_path):
    """torch.set_num_threads(100000) crashed the process (a segmentation fault): refused when parsed."""
    r = run_cli(["compress", "--model", "digits_vit", "--scores", "s.pt", "--threads", "100000", "--out",
                 str(tmp_path / "o.pth")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "argument --threads: expected an int >= 1 and <=" in lines[0]


@pytest.mark.parametrize("flag, value", [("--lr", "1e300"), ("--base-lr", "1e300"), ("--min-lr", "1e300"),
                                         ("--weight-decay", "1e300"), ("--dist-timeout", "1e300"),
                                         ("--mixup", "1e300"), ("--alpha", "1e300"), ("--tau", "1e300")])
def test_numbers_that_overflow_are_refused_when_parsed(tmp_path, capsys, flag, value):
    line = _error(capsys, ["finetune", "--model", "digits_vit", flag, value, "--out", str(tmp_path / "o.pth")])
    assert f"argument {flag}: expected" in line and os.listdir(tmp_path) == []


@every_task
def test_an_image_size_the_machine_cannot_hold(tmp_path, capsys, monkeypatch, task):
    argv = ["train", *task_args(task), *FRESH[task], "--max-iters", "1", "--out", str(tmp_path / "o.pth")]
    line = _error(capsys, argv + ["--img-size", "100000"])  # terabytes of upsampled images: any machine
    assert "img size 100000" in line and "needs at least" in line and "available" in line
    import pm_kernels.pipeline.resources as resources
    monkeypatch.setattr(resources, "available_bytes", lambda device=None: 8 * 2 ** 30)
    assert "img size 2048" in _error(capsys, argv + ["--img-size", "2048"])  # 30 GiB of digits, on 8 GiB
    line = _error(capsys, argv + ["--img-size", "30"])
    assert "not a multiple of the model's patch size 4" in line
    if task == "classification":  # 118 MB of digits at 128x128 fit in 200 MB, a batch of 64 does not
        monkeypatch.setattr(resources, "available_bytes", lambda device=None: 200 * 2 ** 20)
        line = _error(capsys, argv + ["--img-size", "128"])
        assert "training at img size 128 (1025 tokens), batch 64, needs at least" in line
    assert os.listdir(tmp_path) == []


def test_window_must_be_the_models_size(inputs, tmp_path, capsys):  # noqa: F811
    dense = inputs("segmentation")["dense"]
    for window, message in (("16", "the model takes 32x32 windows"), ("64", "the model takes 32x32 windows"),
                            ("-5", "expected a positive int"), ("0", "expected a positive int")):
        line = _error(capsys, ["evaluate", "--task", "segmentation", "--dense", dense, "--window", window,
                               "--repeats", "1", "--out-dir", str(tmp_path / "ev"), "--quiet"])
        assert f"window {window}: " in line and message in line


# ---------------------------------------------------------------- ADE20K images and masks (4, 6, 11)

def _png_header(path, width: int, height: int) -> None:
    """A PNG that declares width × height (an 8-bit grey image) with a tiny body: what a decompression bomb is."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _ade(tmp_path, name="ade"):
    return tmp_path / folder_data("segmentation", tmp_path / name, images_per_class=2)


def _annotation(root, split="training", i=0):
    return root / "annotations" / split / f"ADE_{i}.png"


def test_masks_are_read_as_stored(tmp_path):
    root = _ade(tmp_path)
    labels = (torch.arange(40 * 60) % 151).view(40, 60).to(torch.uint8)
    palette = Image.fromarray(labels.numpy(), mode="P")
    palette.putpalette([255 - (i % 256) for i in range(768)])  # colours whose luminance is not the index
    palette.save(_annotation(root))
    got = ade20k(str(root), crop_size=32).train._read(0)[1]
    want = torch.where(labels == 0, torch.tensor(255), labels.long() - 1)
    assert torch.equal(got, want)  # the palette's indices, not a luminance
    Image.fromarray(torch.full((40, 60), 300, dtype=torch.int32).numpy().astype("uint16")).save(_annotation(root))
    with pytest.raises(PipelineError, match="has label 300 > 150"):  # a 16-bit label, not clipped to 255
        ade20k(str(root), crop_size=32)
    Image.new("RGB", (60, 40), (3, 2, 1)).save(_annotation(root))
    with pytest.raises(PipelineError, match=r"is not a label image \(mode RGB\)"):
        ade20k(str(root), crop_size=32)


def test_ade20k_bounds_and_empty_masks_through_the_cli(tmp_path, capsys, monkeypatch):
    base = ["train", "--task", "segmentation", "--model", "digits_seg_vit", "--max-iters", "1", "--img-size", "32",
            "--out", str(tmp_path / "o.pth"), "--quiet", "--threads", "1"]
    bomb = _ade(tmp_path, "bomb")
    _png_header(bomb / "images" / "training" / "ADE_0.jpg", 30000, 30000)
    assert "at most 89478485 are read" in _error(capsys, base + ["--data", str(bomb)])
    empty = _ade(tmp_path, "empty")
    for i in range(2):
        Image.fromarray(torch.zeros(40, 60, dtype=torch.uint8).numpy()).save(_annotation(empty, i=i))
    assert "training masks label no pixel" in _error(capsys, base + ["--data", str(empty)])
    # strips: resized to a 32-pixel short side, 1x100000 is more pixels than are read; 1x20000 asks for 24 GB of
    # sliding-window logits (here on a machine said to have 1 GiB free)
    model, meta = TASKS["segmentation"].load(None, "digits_seg_vit", num_classes=150,
                                             extra_kwargs={"depth": 1, "in_chans": 3})
    dense = save_checkpoint(model, str(tmp_path / "ade.pth"), meta)
    import pm_kernels.pipeline.resources as resources
    monkeypatch.setattr(resources, "available_bytes", lambda device=None: 2 ** 30)
    for width, message in ((100000, "would be resized to 32x3200000"), (20000, "evaluating an image of 32x640000")):
        strip = _ade(tmp_path, f"strip{width}")
        Image.new("RGB", (width, 1)).save(strip / "images" / "validation" / "ADE_1.jpg", format="PNG")  # JPEG: < 65536
        Image.new("L", (width, 1), 1).save(_annotation(strip, "validation", 1))
        line = _error(capsys, ["evaluate", "--task", "segmentation", "--dense", dense, "--data", str(strip),
                               "--repeats", "1", "--out-dir", str(tmp_path / "ev"), "--quiet", "--threads", "1"])
        assert message in line, line


# ---------------------------------------------------------------- checkpoints (8)

@every_task
def test_a_compressed_checkpoint_is_refused_before_it_is_inflated(inputs, tmp_path, capsys, task):  # noqa: F811
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(inputs(task)["dense"]) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for name in zin.namelist():
            z.writestr(name, zin.read(name))
        z.writestr("dense/data/999", b"\0" * 20_000_000)  # 20 MB of zeros in a few kB
    assert os.path.getsize(deflated) < 1_000_000
    line = _error(capsys, ["evaluate", *task_args(task), "--dense", str(deflated), "--out-dir",
                           str(tmp_path / "ev"), "--quiet"])
    assert "is compressed" in line
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert "not a zip archive" in _error(capsys, ["evaluate", *task_args(task), "--dense", str(legacy),
                                                  "--out-dir", str(tmp_path / "ev"), "--quiet"])


# ---------------------------------------------------------------- silent acceptances (11) and messages (13)

@every_task
def test_scores_and_teachers_that_do_not_fit(inputs, tmp_path, capsys, task):  # noqa: F811
    files = inputs(task)
    other = next(t for t in TASKS if t != task)
    base = ["compress", *task_args(task), "--checkpoint", files["dense"], "--out", str(tmp_path / "pm.pth"),
            "--quiet", "--threads", "1"]
    foreign = save_scores(torch.rand(2, 64) + 0.1, str(tmp_path / "foreign.pt"), {"task": other})
    assert f"calibrated on a {other} model" in _error(capsys, base + ["--scores", foreign])
    zero = save_scores(torch.zeros(2, 64), str(tmp_path / "zero.pt"), {"task": task})
    assert "all zero" in _error(capsys, base + ["--scores", zero])
    tied = torch.rand(2, 64) + 0.1
    tied[1] = 0.5
    code, lines = _run(capsys, base + ["--scores", save_scores(tied, str(tmp_path / "tied.pt"), {"task": task})])
    assert code == 0 and len(lines) == 1 and ": warning: " in lines[0] and "block(s) 1 have all" in lines[0]
    line = _error(capsys, ["finetune", *task_args(task), "--checkpoint", files["dense"], "--teacher",
                           str(tmp_path / "pm.pth"), "--max-iters", "1", "--out", str(tmp_path / "ft.pth"),
                           "--quiet"])
    assert "is already compressed; distil from the dense model" in line


@every_task
def test_nan_scores_are_not_written(inputs, tmp_path, capsys, task):  # noqa: F811
    model, meta = TASKS[task].load(inputs(task)["dense"])
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("pos_embed")).fill_(float("nan"))
    broken = save_checkpoint(model, str(tmp_path / "nan.pth"), meta)
    line = _error(capsys, ["calibrate", *task_args(task), "--checkpoint", broken, "--iters", "1", "--batch-size",
                           "2", "--out", str(tmp_path / "s.pt"), "--quiet", "--threads", "1"])
    assert "scores are not finite" in line and sorted(os.listdir(tmp_path)) == ["nan.pth"]


def test_a_corrupt_image_is_a_warning_line(tmp_path, capsys):
    root = folder_data("classification", tmp_path / "data", images_per_class=2)
    (tmp_path / "data" / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, lines = _run(capsys, ["calibrate", "--model", "digits_vit", "--data", root, "--iters", "1",
                                "--batch-size", "4", "--out", str(tmp_path / "s.pt"), "--quiet", "--threads", "1"])
    assert code == 0 and len(lines) == 1, lines
    assert ": warning: data " in lines[0] and "1.png cannot be read" in lines[0] and "skipped" in lines[0]


def test_a_checkpoint_of_the_other_task_is_named(inputs, tmp_path, capsys):  # noqa: F811
    seg = torch.load(inputs("segmentation")["dense"], weights_only=True)["state_dict"]
    torch.save(seg, tmp_path / "raw_seg.pth")  # no pm_meta: the weights say it
    line = _error(capsys, ["evaluate", "--dense", str(tmp_path / "raw_seg.pth"), "--out-dir", str(tmp_path / "e")])
    assert "a Segmenter's weights" in line and "add --task segmentation" in line
    cls = inputs("classification")["dense"]
    line = _error(capsys, ["evaluate", "--task", "segmentation", "--dense", cls, "--out-dir", str(tmp_path / "e")])
    assert "a classification checkpoint" in line and "add --task classification" in line and "--data" not in line
    # train and finetune start a Segmenter from it: its decoder sized by the data
    assert main(["train", "--task", "segmentation", "--checkpoint", cls, "--max-iters", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "seg.pth"), "--quiet", "--threads", "1"]) == 0
    assert TASKS["segmentation"].load(str(tmp_path / "seg.pth"))[0].num_classes == 11
