#!/usr/bin/env bash
# The GPU work of issue 6 and the kernel issues, cut into steps that each fit one 10-minute call of the
# device tool (README.md there). Run from the repository root on the GPU machine; logs and JSON go to $OUT
# (the device tool's folder that comes back), or to bench/results/gpu_<date> elsewhere.
#
#   bash bench/gpu_session.sh build     # build pm_kernels._C for this GPU's torch, print backends()
#   bash bench/gpu_session.sh test [pytest args]   # the test suite on the GPU (GPU-only matrix included);
#                                   # autotuning compiles every config once, so split it if a call runs out:
#                                   # `test tests/test_attention.py`, then `test tests --deselect tests/test_attention.py`
#   bash bench/gpu_session.sh kernels   # pytest-benchmark: attention vs SDPA / eager + hook, token ops
#   bash bench/gpu_session.sh compare   # bench/compare.py: DeiT-T/S/B, bf16, batch 256, eager + compiled
#
# The build lands in the working tree (pm_kernels/_C*.so, build/), which the device tool keeps between calls
# while the machine stays warm; on a fresh machine run `build` again first.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in build|test|kernels|compare) ;; *) sed -n '2,/^set /p' "$0" | grep "^#"; exit 2 ;; esac
OUT="${OUT:-bench/results/gpu_$(date +%F)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

case "${1:-}" in
  build)
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    "$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" \
      | tee "$OUT/versions.txt"
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20 \
      | tee "$OUT/build.log"
    "$PY" -c "import pm_kernels; print(pm_kernels.backends())" | tee -a "$OUT/build.log"
    ;;
  test)
    shift
    "$PY" -m pytest -q -p no:cacheprovider --timeout 500 -rs "${@:-tests}" 2>&1 | tee -a "$OUT/tests.log"
    ;;
  kernels)
    "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-json "$OUT/kernels.json" 2>&1 \
      | tee "$OUT/kernels.log"
    ;;
  compare)
    "$PY" bench/compare.py --device cuda --batch 256 --dtype bf16 --models deit_tiny,deit_small,deit_base \
      --compile --out "$OUT/compare_gpu_bf16_b256.json" 2>&1 | tee "$OUT/compare.log"
    ;;
esac
