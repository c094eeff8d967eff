"""``torchrun`` with 2 CPU processes (gloo) running ``pm-kernels train`` of every task: a failing or stuck rank
brings the job down in seconds, and a normal run writes once, from rank 0.

Cost: three 2-process jobs per task, about 15 s each on an idle 2-core machine (mostly the two ranks importing
torch and timm), 25-30 s when the machine is busy. Every wait is bounded; a hang fails the test and kills the
processes.
"""
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from cli_subprocess import Streamed, alive, children, environ, kill_all
from task_inputs import FRESH, TASK_NAMES, task_args

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc"),
              pytest.mark.parametrize("task", TASK_NAMES)]

STARTUP_S = 180  # both ranks import torch and timm, then build the model: slow on a busy 2-core machine


def _torchrun(tmp_path: Path, task: str, *extra: str, umask=None) -> Streamed:
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pm_kernels", "train", *task_args(task),
            *FRESH[task], "--batch-size", "16", "--threads", "1", "--out", str(tmp_path / "out.pth"), *extra]
    return Streamed(argv, umask=umask)


def _ranks(job: Streamed) -> dict:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        ranks = {}
        for pid in children(job.proc.pid):
            try:
                ranks[int(environ(pid)["RANK"])] = pid
            except (OSError, KeyError, ValueError):
                pass
        if len(ranks) == 2:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"torchrun did not start 2 ranks:\n{job.output[-2000:]}")


def _start_training(tmp_path: Path, task: str, *extra: str):
    """A long training job, once rank 0's progress bar shows that it is in the training loop."""
    job = _torchrun(tmp_path, task, "--epochs", "1000", *extra)
    assert job.wait_for("train:", STARTUP_S), f"training never started:\n{job.output[-3000:]}"
    return job, _ranks(job)


def _cleanup(job: Streamed, ranks: dict) -> None:
    kill_all(list(ranks.values()) + [job.proc.pid])
    job.proc.wait(timeout=30)


def test_interrupting_one_rank_ends_the_job(tmp_path, task):
    """SIGINT to rank 1 only: the job ends within seconds (it hung for good when the error path entered a
    barrier while rank 0 waited in DDP's all-reduce)."""
    job, ranks = _start_training(tmp_path, task)
    try:
        os.kill(ranks[1], signal.SIGINT)
        start = time.monotonic()
        try:
            code = job.proc.wait(timeout=60)
        except Exception:
            pytest.fail(f"job still running 60 s after SIGINT to rank 1; ranks alive: "
                        f"{[r for r, pid in ranks.items() if alive(pid)]}")
        took = time.monotonic() - start
        assert code != 0
        assert not any(alive(pid) for pid in ranks.values())
        assert "interrupted" in job.output
        assert not (tmp_path / "out.pth").exists() and not list(tmp_path.glob(".*.tmp"))
        print(f"job down {took:.1f} s after SIGINT to rank 1")
    finally:
        _cleanup(job, ranks)


def test_stuck_rank_times_out(tmp_path, task):
    """SIGSTOP to rank 1: rank 0 fails at the --dist-timeout (5 s) with one error line instead of waiting
    for the default 30 min."""
    job, ranks = _start_training(tmp_path, task, "--dist-timeout", "5")
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.monotonic()
        while alive(ranks[0]) and time.monotonic() - start < 60:
            time.sleep(0.2)
        took = time.monotonic() - start
        assert not alive(ranks[0]), "rank 0 still waiting 60 s after rank 1 stopped (timeout 5 s)"
        os.kill(ranks[1], signal.SIGCONT)  # a stopped process cannot act on torchrun's SIGTERM
        assert job.proc.wait(timeout=60) != 0
        lines = [ln for ln in job.output.splitlines() if "pm-kernels train: error:" in ln and "(rank 0 of 2)" in ln]
        assert len(lines) == 1 and lines[0].startswith("pm-kernels train: error:"), job.output[-3000:]
        assert "timed out" in lines[0].lower()
        assert "[rank0]: Traceback" not in job.output  # torch prefixes a rank's uncaught traceback so
        print(f"rank 0 gone {took:.1f} s after rank 1 stopped (timeout 5 s)")
    finally:
        _cleanup(job, ranks)


def test_two_ranks_train_and_rank_0_writes(tmp_path, task):
    """A normal 2-process run exits 0; rank 0 alone writes the checkpoint and JSON, with the umask's mode."""
    from pm_kernels.pipeline.tasks import TASKS

    job = _torchrun(tmp_path, task, "--max-iters", "3", "--quiet", umask=0o027)
    try:
        assert job.proc.wait(timeout=STARTUP_S + 60) == 0, job.output[-3000:]
    finally:
        kill_all([job.proc.pid])
    with open(tmp_path / "out.json") as f:
        result = json.load(f)
    assert result["world_size"] == 2 and result["history"]["iterations"] == 3
    model, meta = TASKS[task].load(str(tmp_path / "out.pth"))
    assert meta["stage"] == "dense"
    for name in ("out.pth", "out.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.pth"]  # no lock or temp file left
