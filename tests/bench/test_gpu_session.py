"""bench/gpu_session.sh, each step run on the CPU (GPU_SESSION_ON_CPU=1: nvidia-smi and the extension build
skipped, the comparison cut to DeiT-T at batch 2), so that the script a GPU session depends on cannot rot: a
flag pytest or compare.py no longer takes, a missing plugin or a moved file fails here first."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bench/gpu_session.sh needs bash")
slow = pytest.mark.slow  # 10-20 s each: every step starts Python and imports torch two or three times


def _run(out, *args):
    # the script's own pytest runs must not think they are xdist workers (pytest-benchmark then refuses to run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(GPU_SESSION_ON_CPU="1", OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, proc.stdout + proc.stderr


def test_usage_lists_every_step(tmp_path):
    proc, text = _run(tmp_path, "nonsense")
    assert proc.returncode == 2
    assert all(f"gpu_session.sh {step}" in text for step in ("build", "test", "kernels", "compare"))


@slow
def test_build(tmp_path):
    proc, text = _run(tmp_path, "build")
    assert proc.returncode == 0, text
    assert (tmp_path / "versions.txt").read_text().startswith("torch ")
    assert "'torch': 'available" in (tmp_path / "build.log").read_text()


@slow
def test_test(tmp_path):
    proc, text = _run(tmp_path, "test", "tests/ops/test_flop_count.py::test_attention_ops_are_counted")
    assert proc.returncode == 0, text
    log = (tmp_path / "tests.log").read_text()
    assert "1 passed" in log
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        assert "no per-test time limit" in log
    else:
        assert "--timeout 500" in log


@slow
def test_kernels(tmp_path):
    # pytest-benchmark with the script's flags: the GPU benchmarks are skipped here, a CPU pair runs once.
    proc, text = _run(tmp_path, "kernels")
    assert proc.returncode == 0, text
    log = (tmp_path / "kernels.log").read_text()
    assert "skipped" in log and " passed" in log and "failed" not in log


@slow
def test_compare(tmp_path):
    proc, text = _run(tmp_path, "compare")
    assert proc.returncode == 0, text
    assert "GPU arguments parse" in (tmp_path / "compare.log").read_text()
    result = json.loads((tmp_path / "compare_cpu_check.json").read_text())
    methods = {row["method"] for row in result["rows"] if "error" not in row}
    assert {"dense", "pm-torch", "pm-optimized", "tome", "evit"} <= methods, result["rows"]
