"""Issue 24 (hardening, round 2), outputs: what a command writes, and when.

- a failed ``export --verify`` leaves the previous file and its JSON as they were (item 2);
- a killed export's ``.pm_export.*`` folder is removed by the next export, which keeps the replaced file's mode
  (items 5, 9);
- an output that is a FIFO or a symbolic link, a planted lock link, an output that is one of the inputs: refused,
  nothing touched (items 7, 10);
- the output is claimed before any input is read (item 13);
- a run killed between its output's rename and its JSON's leaves no stale JSON; a demo's folder is one run's
  files, named with their hashes in the manifest written last (item 14).

Most checks run ``main()`` in-process (the claim fails before any work); the SIGKILL ones run the entry point in a
subprocess with one function replaced by a self-kill.
"""
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from cli_subprocess import ROOT, cli_env, error_lines
from pm_kernels.cli import main
from pm_kernels.pipeline.outputs import claim_output
from task_inputs import every_task, inputs, task_args  # noqa: F401  (inputs: a fixture)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    lines = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def _compress(task, files, out, *extra):
    return ["compress", *task_args(task), "--checkpoint", files["dense"], "--scores", files["scores"], "--out",
            str(out), "--quiet", "--threads", "1", *extra]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- export: verify, temp folders, modes (2, 5, 9)

@pytest.fixture(scope="module")
def compressed(inputs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pm") / "pm.pth"
    assert main(_compress("classification", inputs("classification"), out, "--keep-rate", "0.5")) == 0
    return str(out)


def test_failed_verify_keeps_the_previous_file(compressed, tmp_path, capsys, monkeypatch, umask_022):
    out = tmp_path / "pm.pt2"
    stale = tmp_path / f".pm_export.{_dead_pid()}.abcd1234"  # what an export killed by SIGKILL leaves
    stale.mkdir()
    (stale / "pm.pt2").write_bytes(b"half")
    assert main(["export", "--checkpoint", compressed, "--out", str(out), "--quiet"]) == 0
    assert not stale.exists()  # removed by the next export into the folder (item 5)
    os.chmod(out, 0o600)
    before = {name: (tmp_path / name).read_bytes() for name in ("pm.pt2", "pm.pt2.json")}

    import pm_kernels.deploy
    real = pm_kernels.deploy.load_exported
    monkeypatch.setattr(pm_kernels.deploy, "load_exported", lambda path: (lambda x: real(path)(x) + 1.0))
    line = _error(capsys, ["export", "--checkpoint", compressed, "--out", str(out), "--verify", "--quiet"])
    assert "verify: the exported file differs" in line and "nothing written" in line
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the good file and its JSON
    assert sorted(os.listdir(tmp_path)) == ["pm.pt2", "pm.pt2.json"]  # no temp folder, no lock

    monkeypatch.setattr(pm_kernels.deploy, "load_exported", real)
    assert main(["export", "--checkpoint", compressed, "--out", str(out), "--verify", "--quiet"]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # a replaced file keeps its mode (item 9)


# ---------------------------------------------------------------- outputs that are not files, or are inputs (7, 10)

@every_task
def test_outputs_that_are_not_regular_files_are_refused(inputs, tmp_path, capsys, task):  # noqa: F811
    files = inputs(task)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    assert "is a FIFO" in _error(capsys, _compress(task, files, fifo))
    link = tmp_path / "link.pth"
    link.symlink_to(victim)
    assert "is a symbolic link" in _error(capsys, _compress(task, files, link))
    (tmp_path / "j.json").symlink_to(victim)  # the results JSON of j.pth
    assert "is a symbolic link" in _error(capsys, _compress(task, files, tmp_path / "j.pth"))
    (tmp_path / ".l.pth.lock").symlink_to(victim)  # a lock planted as a link: it would be emptied
    assert "cannot write" in _error(capsys, _compress(task, files, tmp_path / "l.pth"))
    assert victim.read_text() == "keep me\n" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert all(os.path.islink(tmp_path / n) for n in ("link.pth", "j.json", ".l.pth.lock"))
    assert sorted(os.listdir(tmp_path)) == [".l.pth.lock", "fifo.pth", "j.json", "link.pth", "victim.txt"]


@every_task
def test_an_output_may_not_be_an_input(inputs, tmp_path, capsys, task):  # noqa: F811
    files = inputs(task)
    dense = tmp_path / "d.pth"
    dense.write_bytes(open(files["dense"], "rb").read())
    os.link(dense, tmp_path / "hard.pth")
    before = dense.read_bytes()
    common = [*task_args(task), "--quiet", "--threads", "1"]
    for argv in (["export", "--checkpoint", str(dense), "--format", "pt2", "--out", str(dense)],
                 ["finetune", "--checkpoint", str(dense), "--teacher", str(dense), "--out", str(dense)],
                 ["finetune", "--checkpoint", files["dense"], "--teacher", str(dense), "--out",
                  str(tmp_path / "hard.pth")],
                 ["compress", "--checkpoint", files["dense"], "--scores", str(dense), "--out", str(dense)]):
        assert "is the input" in _error(capsys, argv + common)
    assert dense.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["d.pth", "hard.pth"]


# ---------------------------------------------------------------- the claim comes first (13)

@every_task
@pytest.mark.parametrize("command", ["compress", "export", "evaluate"])
def test_output_is_claimed_before_any_input_is_read(tmp_path, capsys, task, command):
    missing = str(tmp_path / "missing.pth")  # read first, this input would be the error
    out = tmp_path / {"compress": "pm.pth", "export": "pm.onnx", "evaluate": "ev"}[command]
    argv = {"compress": ["--checkpoint", missing, "--scores", missing, "--out", str(out)],
            "export": ["--checkpoint", missing, "--out", str(out)],
            "evaluate": ["--dense", missing, "--out-dir", str(out)]}[command]
    with claim_output(str(out), is_dir=command == "evaluate"):
        line = _error(capsys, [command, *task_args(task), "--quiet", *argv])
    assert "in use by another pm-kernels run" in line and "missing" not in line


# ---------------------------------------------------------------- consistent sets of outputs (14)

def _killed_run(argv, module: str, function: str) -> int:
    """The entry point in a subprocess, ``module.function`` replaced by a SIGKILL of the process."""
    code = (f"import os, signal, sys, {module} as m\n"
            f"m.{function} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from pm_kernels.cli import main\n"
            f"main({argv!r})\n")
    return subprocess.run([sys.executable, "-c", code], env=cli_env(), cwd=str(ROOT), capture_output=True,
                          timeout=300).returncode


def test_no_stale_json_beside_a_new_checkpoint(inputs, tmp_path):  # noqa: F811
    files = inputs("classification")
    out, record = tmp_path / "pm.pth", tmp_path / "pm.json"
    out.write_bytes(b"previous run")
    record.write_text('{"previous": true}\n')
    # killed after the checkpoint's rename, before its JSON's
    status = _killed_run(_compress("classification", files, out), "pm_kernels.pipeline.commands", "save_json")
    assert status == -signal.SIGKILL
    assert out.read_bytes() != b"previous run" and not record.exists()


def test_an_interrupted_demo_leaves_one_runs_files(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    previous = {"dense.pth": b"old", "pm_keep0.5.pth": b"old", "extra.bin": b"old"}
    for name, data in previous.items():
        (out / name).write_bytes(data)
    (out / "results.json").write_text(json.dumps({"outputs": {n: hashlib.sha256(d).hexdigest()
                                                              for n, d in previous.items()}}))
    (out / "notes.txt").write_text("mine")  # not the demo's: stays
    status = _killed_run(["demo", "--quick", "--out", str(out), "--quiet", "--threads", "1"],
                         "pm_kernels.pipeline.demo", "train")
    assert status == -signal.SIGKILL
    # no manifest, nothing of the previous run (the lock file stays after a SIGKILL; the system released the lock)
    assert sorted(os.listdir(out)) == [".pm-kernels.lock", "notes.txt"]
