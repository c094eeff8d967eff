"""The CLI's promises under hostile input: one ``error:`` line and exit 2 for every bad flag or output path,
outputs never clobbered by their own results JSON, SIGTERM handled like SIGINT (exit 143, no temp file), temp
files of a killed writer cleaned, file modes from the umask or the replaced file, one writer per output.
Every promise that goes through a command is checked for every task (``TASK_NAMES``); the file-level ones
(atomic writes, temp files, modes, locks) are the same code for all.

Subprocess tests run the real entry point (5-20 s each: mostly importing torch and timm); the flag matrix runs
``main()`` in-process (it stops at parsing).
"""
import errno
import os
import signal
import stat

import pytest
import torch

from cli_subprocess import Streamed, cli_command, error_lines, run_cli
from pm_kernels.cli import main
from pm_kernels.pipeline.io import PipelineError, atomic_write, save_json
from task_inputs import FRESH, every_task, inputs, task_args  # noqa: F401  (inputs: a fixture)



def _listing(folder):
    return sorted(os.listdir(folder))


def _main_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert exc.value.code == 2 and len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- item 2: --out and its results JSON

@every_task
def test_out_named_json_is_refused_not_clobbered(inputs, tmp_path, capsys, task):
    files = inputs(task)
    target = tmp_path / "y" / "pm.json"
    target.parent.mkdir()
    target.write_text('{"mine": 1}\n')
    line = _main_error(capsys, ["compress", *task_args(task), "--checkpoint", files["dense"], "--scores",
                                files["scores"], "--out", str(target), "--quiet"])
    assert "results JSON would overwrite it" in line
    assert target.read_text() == '{"mine": 1}\n' and _listing(target.parent) == ["pm.json"]


@every_task
def test_visualize_out_json_refused(inputs, tmp_path, capsys, task):
    line = _main_error(capsys, ["visualize", *task_args(task), "--checkpoint", inputs(task)["dense"], "--out",
                                str(tmp_path / "v.json")])
    assert "results JSON" in line and _listing(tmp_path) == []


@every_task
def test_companion_json_may_not_overwrite_an_input(inputs, tmp_path, capsys, task):
    checkpoint = tmp_path / "model.json"  # a checkpoint with an unlucky name
    checkpoint.write_bytes(open(inputs(task)["dense"], "rb").read())
    line = _main_error(capsys, ["visualize", *task_args(task), "--checkpoint", str(checkpoint), "--out",
                                str(tmp_path / "model.png")])
    assert "would overwrite the input" in line and _listing(tmp_path) == ["model.json"]


# ---------------------------------------------------------------- item 5: every numeric flag, at parse time

_TRAIN = ["train", "--model", "digits_vit", "--max-iters", "1"]
_FINETUNE = ["finetune", "--model", "digits_vit", "--alpha", "0", "--max-iters", "1"]


@every_task
@pytest.mark.parametrize("argv, flag", [
    (_TRAIN + ["--epochs", "nan"], "--epochs"),
    (_TRAIN + ["--epochs", "inf"], "--epochs"),
    (_TRAIN + ["--epochs", "0"], "--epochs"),
    (_TRAIN + ["--lr", "nan"], "--lr"),
    (_TRAIN + ["--base-lr", "-1e-4"], "--base-lr"),
    (_TRAIN + ["--min-lr", "-1"], "--min-lr"),
    (_TRAIN + ["--weight-decay", "nan"], "--weight-decay"),
    (_TRAIN + ["--smoothing", "2"], "--smoothing"),
    (_TRAIN + ["--smoothing", "1"], "--smoothing"),
    (_TRAIN + ["--mixup", "-1"], "--mixup"),
    (_TRAIN + ["--cutmix", "inf"], "--cutmix"),
    (_TRAIN + ["--warmup-iters", "-5"], "--warmup-iters"),
    (_TRAIN + ["--workers", "-1"], "--workers"),
    (_TRAIN + ["--batch-size", "0"], "--batch-size"),
    (_TRAIN + ["--threads", "0"], "--threads"),
    (_TRAIN + ["--seed", "-1"], "--seed"),
    (_TRAIN + ["--seed", str(2**32)], "--seed"),
    (_TRAIN + ["--img-size", "-32"], "--img-size"),
    (_TRAIN + ["--device", "meta"], "--device"),
    (_TRAIN + ["--device", "cuda:x"], "--device"),
    (_TRAIN + ["--dist-timeout", "inf"], "--dist-timeout"),
    (_FINETUNE + ["--alpha", "nan"], "--alpha"),
    (_FINETUNE + ["--tau", "0"], "--tau"),
    (["calibrate", "--model", "digits_vit", "--iters", "0"], "--iters"),
    (["evaluate", "--model", "digits_vit", "--repeats", "0"], "--repeats"),
    (["visualize", "--model", "digits_vit", "--index", "-1"], "--index"),
    (["compress", "--model", "digits_vit", "--scores", "s.pt", "--prune-rate", "nan"], "--prune-rate"),
    (["demo", "--keep-rates", "0.5", "inf"], "--keep-rates"),
])
def test_numeric_flag_rejected_at_parse_time(tmp_path, capsys, argv, flag, task):
    out = ["--out", str(tmp_path / "o.pth")] if argv[0] not in ("evaluate", "demo") else []
    line = _main_error(capsys, argv + task_args(task) + out)
    assert flag in line and "expected" in line
    assert _listing(tmp_path) == []


@every_task
def test_bad_flag_through_the_entry_point(tmp_path, task):
    r = run_cli(["train", *task_args(task), *FRESH[task], "--epochs", "nan", "--out", str(tmp_path / "o.pth")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("pm-kernels train: error: argument --epochs:") and "'nan'" in lines[0]


@every_task
def test_out_naming_a_folder(inputs, tmp_path, capsys, task):
    files = inputs(task)
    line = _main_error(capsys, ["compress", *task_args(task), "--checkpoint", files["dense"], "--scores",
                                files["scores"], "--out", str(tmp_path), "--quiet"])
    assert "is a folder" in line and _listing(tmp_path) == []


@every_task
def test_out_under_a_file(inputs, tmp_path, capsys, task):
    files = inputs(task)
    (tmp_path / "f").write_text("x")
    line = _main_error(capsys, ["compress", *task_args(task), "--checkpoint", files["dense"], "--scores",
                                files["scores"], "--out", str(tmp_path / "f" / "pm.pth"), "--quiet"])
    assert "not a folder" in line and _listing(tmp_path) == ["f"]


def test_write_failure_is_one_line(tmp_path):
    def disk_full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(PipelineError, match="No space left"):
        atomic_write(str(tmp_path / "x.json"), disk_full)
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------- item 6: signals, temp files, modes

@every_task
def test_sigterm_exits_143_and_leaves_no_temp_file(tmp_path, task):
    out = tmp_path / "dense.pth"
    job = Streamed(cli_command() + ["train", *task_args(task), *FRESH[task], "--epochs", "1000", "--threads", "1",
                                    "--out", str(out)])
    try:
        assert job.wait_for("train:", 120), job.output[-2000:]
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=60) == 143, job.output[-2000:]
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait(timeout=30)
    assert job.output.rstrip().endswith("pm-kernels train: terminated"), job.output[-500:]
    assert "Traceback" not in job.output
    assert _listing(tmp_path) == []  # no checkpoint, no temp file, no lock file


def _killed_while_writing(target) -> int:
    """Fork a writer of ``target`` that SIGKILLs itself half-way through; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: file operations only, then the kill
        try:
            def write(tmp):
                with open(tmp, "w") as f:
                    f.write("half")
                os.kill(os.getpid(), signal.SIGKILL)
            atomic_write(str(target), write)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1]


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old\n")
    status = _killed_while_writing(target)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = [n for n in _listing(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and target.read_text() == "old\n"  # the SIGKILL left one; the target is intact
    save_json({"new": 1}, str(target))
    assert _listing(tmp_path) == ["r.json"]


def test_live_writers_temp_file_is_kept(tmp_path):
    target = tmp_path / "r.json"
    mine = tmp_path / f".r.json.{os.getpid()}.abcd1234.tmp"  # as if this process were writing it right now
    mine.write_text("")
    save_json({"new": 1}, str(target))
    assert mine.exists()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_file_mode_follows_umask(tmp_path, umask_027):
    path = save_json({"a": 1}, str(tmp_path / "new.json"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_replaced_file_keeps_its_mode(tmp_path, umask_027):
    target = tmp_path / "kept.json"
    target.write_text("{}")
    os.chmod(target, 0o604)
    save_json({"a": 1}, str(target))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o604


# ---------------------------------------------------------------- item 7: one writer per output
# (a busy output refused before any work, by every command of every task: tests/pipeline/test_tasks.py)

def test_file_output_lock(tmp_path):
    from pm_kernels.pipeline.outputs import claim_output
    target = str(tmp_path / "pm.pth")
    with claim_output(target):
        with pytest.raises(PipelineError, match="in use"):
            with claim_output(target):
                pass
    with claim_output(target):  # released: free again
        pass
    assert _listing(tmp_path) == []
