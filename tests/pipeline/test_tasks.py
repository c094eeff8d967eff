"""One pipeline for every task: each registered task has its test inputs, takes every subcommand (export too),
and every command claims its output before its long work. Before the tasks shared one ``commands`` module,
segmentation ``calibrate`` and ``evaluate`` claimed their output only after the work, the segmentation demo
took no lock, and ``pm-kernels export`` could not export a segmentation checkpoint."""
import json
import os
import sys

import pytest
import torch

from pm_kernels.cli import build_parser, main
from pm_kernels.pipeline.outputs import claim_output
from pm_kernels.pipeline.tasks import TASKS
from task_inputs import FRESH, dense_checkpoint, every_task, folder_data, inputs, task_args  # noqa: F401

COMMANDS = ("train", "calibrate", "compress", "finetune", "evaluate", "visualize", "demo", "export")


@every_task
def test_every_task_has_test_inputs(tmp_path, task):
    """A new task brings what the command-line tests need (tests/task_inputs.py)."""
    files = dense_checkpoint(task, tmp_path / "c")
    model, meta = TASKS[task].load(files["dense"])
    assert meta["task"] == task and meta["stage"] == "dense"
    root = folder_data(task, tmp_path / "data")
    assert TASKS[task].load_data(root, img_size=8).num_classes >= 2
    assert task in FRESH


@every_task
@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_takes_the_task(command, task):
    assert "--task" in build_parser()._subparsers._group_actions[0].choices[command].format_help()
    args = build_parser().parse_args([command, *task_args(task)] + (["--out", "x"] if command not in
                                                                   ("evaluate", "demo") else []) +
                                     (["--scores", "s.pt"] if command == "compress" else []))
    assert args.task == task


def _no_work_before_the_claim(monkeypatch):
    """Fail the test if a command starts its long work: a data loader iterated, calibration or compression run."""
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before claiming its output")
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", work)
    for module in ("calibrate", "compress"):  # the modules (the package's names are the functions)
        monkeypatch.setattr(sys.modules[f"pm_kernels.{module}"], module, work)


@every_task
@pytest.mark.parametrize("command", ["calibrate", "compress", "evaluate", "visualize", "train", "finetune", "demo"])
def test_a_busy_output_is_refused_before_the_work(inputs, tmp_path, capsys, monkeypatch, task, command):
    files = inputs(task)
    out = tmp_path / ("out_dir" if command in ("evaluate", "demo") else "out.pth")
    argv = {
        "calibrate": ["--checkpoint", files["dense"], "--iters", "1", "--out", str(out)],
        "compress": ["--checkpoint", files["dense"], "--scores", files["scores"], "--out", str(out)],
        "evaluate": ["--dense", files["dense"], "--repeats", "1", "--out-dir", str(out)],
        "visualize": ["--checkpoint", files["dense"], "--out", str(out)],
        "train": ["--checkpoint", files["dense"], "--max-iters", "1", "--out", str(out)],
        "finetune": ["--checkpoint", files["dense"], "--alpha", "0", "--max-iters", "1", "--out", str(out)],
        "demo": ["--quick", "--out", str(out)],
    }[command]
    with claim_output(str(out), is_dir=command in ("evaluate", "demo")):  # a first run holds the output
        _no_work_before_the_claim(monkeypatch)
        with pytest.raises(SystemExit) as exc:
            main([command, *task_args(task), "--quiet", "--threads", "1", *argv])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "in use by another pm-kernels run" in lines[0], lines
    assert f"pid {os.getpid()}" in lines[0]  # the first run is named
    # nothing written, and the first run's lock file is gone with it
    assert os.listdir(out if out.is_dir() else tmp_path) == []


@every_task
def test_export_takes_every_task(inputs, tmp_path, task):
    """A compressed checkpoint of each task exports (folded) and runs as the model does (``--verify``)."""
    files = inputs(task)
    pm = str(tmp_path / "pm.pth")
    assert main(["compress", *task_args(task), "--checkpoint", files["dense"], "--scores", files["scores"],
                 "--keep-rate", "0.5", "--out", pm, "--quiet"]) == 0
    out = tmp_path / "pm.pt2"
    assert main(["export", *task_args(task), "--checkpoint", pm, "--out", str(out), "--batch-size", "2", "--verify",
                 "--quiet"]) == 0
    record = json.loads((tmp_path / "pm.pt2.json").read_text())
    assert out.stat().st_size > 0 and record["task"] == task
    assert max(record["verify_max_abs_diff"].values()) <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["pm.json", "pm.pt2", "pm.pt2.json", "pm.pth"]
