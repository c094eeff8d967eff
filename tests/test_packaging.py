"""Packaging: one version, the build record that setup.py writes, and what the package says when the native
build failed. The release artefacts themselves (sdist file list, wheel in a fresh venv) are checked by
`make check-dist` (.ci/check_dist.sh), which needs a full extension build."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

import pm_kernels
from pm_kernels import _build_info, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_one_the_metadata_gets():
    setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
    config = setuptools_config.read_configuration(os.path.join(ROOT, "pyproject.toml"), expand=True)
    assert config["project"]["version"] == pm_kernels.__version__
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pm_kernels._version.__version__"}


FAILED = {"extension": "failed", "reason": "csrc/pm_ops.h is missing", "torch": "2.14.1"}


def test_unavailable_reason_says_what_the_build_record_says():
    err = ImportError("No module named 'pm_kernels._C'")
    assert "csrc/pm_ops.h is missing" in _build_info.unavailable_reason(err, FAILED)
    skipped = {"extension": "skipped", "reason": "PM_KERNELS_NO_EXT=1 at install time"}
    assert "PM_KERNELS_NO_EXT=1" in _build_info.unavailable_reason(err, skipped)
    other_torch = {"extension": "built", "kernels": "cpu", "torch": "0.0.1"}
    assert "built against torch 0.0.1" in _build_info.unavailable_reason(OSError("undefined symbol"), other_torch)
    assert "not built" in _build_info.unavailable_reason(err, {})  # a checkout never built: no record


def test_import_warns_only_when_the_build_failed():
    for record in (FAILED, {"extension": "built", "kernels": "cpu", "cuda_failed": True, "reason": "nvcc died"}):
        with pytest.warns(_build_info.ExtensionBuildWarning, match=record["reason"]):
            _build_info.warn_if_build_failed(record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for record in ({"extension": "built", "kernels": "cpu+cuda", "cuda_failed": False},
                       {"extension": "skipped", "reason": "PM_KERNELS_NO_EXT=1 at install time"}):
            _build_info.warn_if_build_failed(record)


def test_backends_says_why_the_extension_is_missing(tmp_path, monkeypatch):
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps(FAILED))
    monkeypatch.setattr(_build_info, "RECORD_PATH", str(record))
    monkeypatch.setitem(sys.modules, "pm_kernels._C", None)  # importing it now raises ImportError
    ok, why = dispatch._probe_extension()
    assert not ok and "building pm_kernels._C failed" in why and "csrc/pm_ops.h is missing" in why


def _copy_build_tree(dest, source):
    """A minimal tree setup.py builds: the build files, a package, and csrc/pm_ops.cpp = ``source``."""
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), dest / name)
    (dest / "pm_kernels").mkdir()
    shutil.copy(os.path.join(ROOT, "pm_kernels", "_version.py"), dest / "pm_kernels" / "_version.py")
    (dest / "pm_kernels" / "__init__.py").write_text("")
    (dest / "csrc").mkdir()
    (dest / "csrc" / "pm_ops.cpp").write_text(source)


def _build_ext(tree, **env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PM_KERNELS_")} | {"PM_KERNELS_NO_CUDA": "1", **env}
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_failed_compile_installs_and_is_recorded(tmp_path):
    if not shutil.which("c++"):
        pytest.skip("no C++ compiler")
    _copy_build_tree(tmp_path, "#error deliberately broken for the packaging test\n")
    run = _build_ext(tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "pm_kernels" / "_build_info.json").read_text())
    assert record["extension"] == "failed"
    assert "deliberately broken" in record["reason"], record  # the compiler's own error line


def test_require_ext_makes_a_missing_source_an_error(tmp_path):
    if not shutil.which("c++"):
        pytest.skip("no C++ compiler")
    _copy_build_tree(tmp_path, '#include "pm_ops.h"\n')  # the header is not there, as in the 0.1.0 sdist bug
    run = _build_ext(tmp_path, PM_KERNELS_REQUIRE_EXT="1")
    assert run.returncode != 0
    assert "csrc/pm_ops.h is missing" in run.stderr and "PM_KERNELS_REQUIRE_EXT=1" in run.stderr
