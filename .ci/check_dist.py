"""Checks of the release artefacts, called by .ci/check_dist.sh (`make check-dist`).

    python .ci/check_dist.py sdist dist/pm_kernels-X.tar.gz
        the sdist carries every file the build needs (csrc/, CMakeLists.txt, the package, the build files,
        README, LICENSE, CHANGELOG) and no build product or local state; its version is pm_kernels/_version.py's.
    <fresh venv>/bin/python -I .ci/check_dist.py installed --prefix <fresh venv> --kernels cpu+cuda|cpu
        in a fresh venv that got the wheel: pm_kernels and pm_kernels._C are imported from that venv (not from
        the checkout or an editable install), the metadata version equals pm_kernels.__version__, the build
        record says the extension was built with the expected kernels, an op runs through it, and
        `pm-kernels --help` runs. Run it with -I so that neither the working directory nor PYTHONPATH is on
        sys.path.

Each failed check prints one `check_dist: FAIL ...` line; the exit status is 1 if any failed.
"""
import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_FILES = ["CHANGELOG.md", "CMakeLists.txt", "LICENSE", "MANIFEST.in", "README.md", "pyproject.toml", "setup.py"]
FORBIDDEN = ["*.so", "*.o", "*.pyc", "*/__pycache__/*", "pm_kernels/_build_info.json", "bench/results/*",
             "docs/*", "runs/*", ".ci/*", "build/*", "dist/*"]

failures = []


def check(ok, what):
    print(f"check_dist: {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def _tracked(*folders):
    """The repository's files under ``folders`` (git ls-files; a walk of the folders without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", *folders], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return sorted(line for line in out.splitlines() if line)
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder in folders:
            for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
                dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                found += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
        return sorted(found)


def _source_version():
    with open(os.path.join(ROOT, "pm_kernels", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)


def check_sdist(path):
    with tarfile.open(path) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        members = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    version = _source_version()
    check(top == f"pm_kernels-{version}", f"sdist folder {top} is pm_kernels-{version}")
    check(f"\nVersion: {version}\n" in pkg_info, f"sdist metadata version is {version}")
    check("License-Expression: Apache-2.0" in pkg_info, "sdist metadata names the license")
    needed = BUILD_FILES + [f for f in _tracked("csrc", "pm_kernels", "tests") if not f.endswith(".so")]
    missing = [f for f in needed if f not in members]
    check(not missing, "sdist carries csrc/, the package, tests and the build files" + _listed("missing", missing))
    unwanted = sorted(m for m in members if any(fnmatch.fnmatch(m, p) for p in FORBIDDEN))
    check(not unwanted, "sdist has no build products or local state" + _listed("has", unwanted))


def _listed(what, names):
    return f" ({what}: {', '.join(names)})" if names else ""


def _under(path, prefix):
    path, prefix = os.path.realpath(path), os.path.realpath(prefix)
    return os.path.commonpath([path, prefix]) == prefix


def check_installed(prefix, kernels):
    import importlib.metadata
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import pm_kernels
    from pm_kernels import _build_info

    build_warnings = [str(w.message) for w in caught if issubclass(w.category, _build_info.ExtensionBuildWarning)]
    check(not build_warnings, f"import pm_kernels warns nothing about the build {build_warnings or ''}")
    check(_under(pm_kernels.__file__, prefix), f"pm_kernels is imported from the fresh venv ({pm_kernels.__file__})")
    editable = sorted(m for m in sys.modules if m.startswith("__editable__"))
    check(not editable, f"no editable-install finder is loaded {editable or ''}")
    dist = importlib.metadata.distribution("pm_kernels")
    dist_file = os.path.realpath(str(dist.locate_file("pm_kernels/__init__.py")))
    check(dist_file == os.path.realpath(pm_kernels.__file__),
          f"the metadata found is the installed wheel's ({dist_file})")
    check(dist.version == pm_kernels.__version__,
          f"metadata version {dist.version} == pm_kernels.__version__ {pm_kernels.__version__}")

    import torch
    import pm_kernels._C

    check(_under(pm_kernels._C.__file__, prefix), f"pm_kernels._C loads from the fresh venv ({pm_kernels._C.__file__})")
    record = _build_info.read() or {}
    check(record.get("extension") == "built" and record.get("kernels") == kernels and not record.get("cuda_failed"),
          f"build record says built with {kernels} kernels ({record})")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("pm_kernels::merge_fwd", "CUDA")
    check(has_cuda == (kernels == "cpu+cuda"), f"CUDA kernels registered: {has_cuda}")
    check(pm_kernels.backends()["cuda"].startswith("available"), f"backends()['cuda']: {pm_kernels.backends()['cuda']}")
    x, M = torch.randn(2, 7, 5, dtype=torch.float64), torch.rand(3, 7, dtype=torch.float64)
    got, want = pm_kernels.merge(x, M, backend="cuda"), pm_kernels.merge(x, M, backend="torch")
    check(torch.allclose(got, want), "merge through the extension's CPU kernel equals the torch backend")

    script = os.path.join(prefix, "bin", "pm-kernels")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, cwd=prefix)
    error = run.stderr.strip()[-500:] if run.returncode else ""
    check(run.returncode == 0 and "usage" in run.stdout.lower(),
          f"`pm-kernels --help` runs (status {run.returncode}) {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sdist = sub.add_parser("sdist")
    sdist.add_argument("path")
    installed = sub.add_parser("installed")
    installed.add_argument("--prefix", required=True, help="the fresh venv the wheel was installed into")
    installed.add_argument("--kernels", required=True, choices=["cpu+cuda", "cpu"])
    args = parser.parse_args()
    if args.what == "sdist":
        check_sdist(args.path)
    else:
        check_installed(args.prefix, args.kernels)
    if failures:
        print(f"check_dist: {len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
