#!/usr/bin/env bash
# The release check (`make check-dist`, after `make dist` built dist/: the sdist, and a wheel built from the
# unpacked sdist, CPU + CUDA when a toolkit is found):
#   1. the sdist's file list (.ci/check_dist.py sdist);
#   2. the wheel, installed into a fresh venv that sees .venv's packages (the pinned torch) through a .pth file
#      but not the checkout: pm_kernels._C loads from there, versions agree, `pm-kernels --help` runs;
#   3. a CPU-only wheel built from the same sdist (PM_KERNELS_NO_CUDA=1), installed and checked the same way.
# PM_KERNELS_REQUIRE_EXT=1 throughout: a build that fails (a source missing from the sdist) fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PY:-.venv/bin/python}"
FRESH="$ROOT/.venv-dist"
CPU_WHEELS="build/dist-cpu"
export PM_KERNELS_REQUIRE_EXT=1
unset PYTHONPATH
start=$(date +%s)
say() { echo "[check-dist] $* ($(( $(date +%s) - start )) s)"; }

sdists=(dist/pm_kernels-*.tar.gz)
wheels=(dist/pm_kernels-*.whl)
[ "${#sdists[@]}" = 1 ] && [ -f "${sdists[0]}" ] && [ "${#wheels[@]}" = 1 ] && [ -f "${wheels[0]}" ] \
  || { echo "[check-dist] expected one sdist and one wheel in dist/ (run make dist)" >&2; exit 1; }

"$PY" .ci/check_dist.py sdist "${sdists[0]}"
say "sdist checked"

install_and_check() {  # wheel, expected kernels
  rm -rf "$FRESH"
  "$PY" -m venv --without-pip "$FRESH"
  # The pinned torch & co. (pip and setuptools too) from .venv: its site-packages as a path entry. Path entries
  # added by a .pth file do not run that folder's own .pth files, so .venv's editable install of this checkout
  # stays inactive.
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$("$FRESH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_venv.pth"
  # -I: install even though .venv's editable pm_kernels (same version) is visible; --no-deps: .venv has them,
  # and `pip check` then checks the wheel's requirements against what the venv sees.
  "$FRESH/bin/python" -m pip install -q --no-index --no-deps --ignore-installed "$1"
  "$FRESH/bin/python" -m pip check
  (cd "$FRESH" && "$FRESH/bin/python" -I "$ROOT/.ci/check_dist.py" installed --prefix "$FRESH" --kernels "$2")
}

kernels=cpu
# setup.py's rule: CUDA kernels when torch is a CUDA build and a toolkit is found (the Makefile sets CUDA_HOME).
"$PY" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
  && kernels=cpu+cuda
install_and_check "${wheels[0]}" "$kernels"
say "wheel ($kernels) installed and checked"

rm -rf "$CPU_WHEELS"
PM_KERNELS_NO_CUDA=1 "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$CPU_WHEELS" "${sdists[0]}"
say "CPU-only wheel built from the sdist"
install_and_check "$CPU_WHEELS"/pm_kernels-*.whl cpu
say "CPU-only wheel installed and checked"
rm -rf "$FRESH"
