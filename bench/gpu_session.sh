#!/usr/bin/env bash
# The GPU work of issue 6 and the kernel issues, cut into steps that each fit one 10-minute call of the
# device tool (README.md there). Run from the repository root on the GPU machine; logs and JSON go to $OUT
# (the device tool's folder that comes back), or to bench/results/gpu_<date> elsewhere.
#
#   bash bench/gpu_session.sh build     # build pm_kernels._C for this GPU's torch, print backends()
#   bash bench/gpu_session.sh test [pytest args]   # the test suite on the GPU (the GPU-only matrix runs first);
#                                   # autotuning compiles every config once, so split it if a call runs out:
#                                   # `test tests/ops/test_attention.py`, then `test tests --deselect tests/ops/test_attention.py`
#   bash bench/gpu_session.sh kernels   # pytest-benchmark: attention vs SDPA / eager + hook, token ops (and the
#                                   # CPU cases: the extension's C++ token ops, dense vs PM model forwards)
#   bash bench/gpu_session.sh compare   # bench/compare.py: DeiT-T/S/B, bf16, batch 256, eager + compiled
#
# GPU_SESSION_ON_CPU=1 runs every step on a CPU with the GPU parts skipped (no nvidia-smi, no extension build,
# one CPU benchmark pair once unmeasured, compare on timm's 6-block test_vit at batch 2, no compile): tests/bench/test_gpu_session.py
# does, so that the script cannot rot.
# The build lands in the working tree (pm_kernels/_C*.so, build/), which the device tool keeps between calls
# while the machine stays warm; on a fresh machine run `build` again first.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in build|test|kernels|compare) ;; *) sed -n '2,/^set /p' "$0" | grep "^#"; exit 2 ;; esac
OUT="${OUT:-bench/results/gpu_$(date +%F)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
ON_CPU="${GPU_SESSION_ON_CPU:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

case "${1:-}" in
  build)
    if [ -n "$ON_CPU" ]; then
      echo "GPU_SESSION_ON_CPU: nvidia-smi and the extension build skipped" | tee "$OUT/nvidia-smi.txt"
      export PM_KERNELS_NO_EXT=1
    else
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    fi
    "$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" \
      | tee "$OUT/versions.txt"
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20 \
      | tee "$OUT/build.log"
    "$PY" -c "import pm_kernels; print(pm_kernels.backends())" | tee -a "$OUT/build.log"
    ;;
  test)
    shift
    # A per-test limit keeps one hung kernel from eating the whole device call (pytest-timeout, in
    # requirements-dev.txt); without the plugin the suite still runs, unlimited.
    LIMIT=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then LIMIT=(--timeout 500); else
      echo "pytest-timeout not installed: no per-test time limit" | tee -a "$OUT/tests.log"; fi
    CMD=("$PY" -m pytest -q -p no:cacheprovider ${LIMIT[@]+"${LIMIT[@]}"} -rs "${@:-tests}")
    echo "+ ${CMD[*]}" | tee -a "$OUT/tests.log"
    "${CMD[@]}" 2>&1 | tee -a "$OUT/tests.log"
    ;;
  kernels)
    if [ -n "$ON_CPU" ]; then  # a smoke test: the fused token op's two CPU benchmarks run once, unmeasured
      "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable -k "not cpu or reconstruct_merge" 2>&1 \
        | tee "$OUT/kernels.log"
    else
      "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-json "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log"
    fi
    ;;
  compare)
    ARGS=(--device cuda --batch 256 --dtype bf16 --models deit_tiny,deit_small,deit_base --compile
          --out "$OUT/compare_gpu_bf16_b256.json")
    if [ -n "$ON_CPU" ]; then  # the GPU command line must still parse; the run itself is cut down
      "$PY" -c "import sys; from bench import compare; compare.parse_args(sys.argv[1:]); print('GPU arguments parse')" \
        "${ARGS[@]}" 2>&1 | tee "$OUT/compare.log" || exit 1
      ARGS=(--device cpu --batch 2 --models test_vit --keep-rates 0.6 --repeats 1 --warmup 1 --iters 1 --threads 1
            --out "$OUT/compare_cpu_check.json")
    fi
    "$PY" bench/compare.py "${ARGS[@]}" 2>&1 | tee -a "$OUT/compare.log"
    ;;
esac
