#!/usr/bin/env bash
# The GPU path, checked for real on a machine with one NVIDIA GPU and no network:
#
#     scripts/gpu-wheels.sh            # here, with network: the dependencies a bare GPU box lacks -> .whl/
#     scripts/gpu-check.sh OUTDIR      # there: builds, runs the GPU tests and bench/bench_gpu.py
#
# Expects python3 (3.10+) with torch, cupy (CUDA 12 or 13 build), cython, uvloop, xxhash, aiohttp,
# prometheus-client and rich installed; everything else comes from .whl/ (installed into a private
# --target dir, never into the system). Writes into OUTDIR: nvidia-smi.txt, build.log, tests.log
# (the GPU tests, which must not skip there, and the engine/warmup tests on the same machine),
# bench.txt and bench.json (H2D vs plain pinned cudaMemcpy, start -> READY on the GPU, tokens/s vs
# transformers), and summary.txt. Exit status: non-zero if the build or a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
{
    date -u
    git log --oneline -1 2>/dev/null || true
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
} >"$OUT/nvidia-smi.txt"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/butterfly-site .whl/*.whl >"$OUT/wheels.log" 2>&1 || { echo "wheel install failed"; status=1; }
    export PYTHONPATH=/tmp/butterfly-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

echo "== build the extension"
"$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { echo "build failed (see build.log)"; status=1; }

echo "== GPU tests"
"$PY" - >"$OUT/gpu.txt" 2>&1 <<'PYEOF'
from butterfly.hardware import detect
from butterfly.loader import gpu
print("gpu_available:", gpu.gpu_available())
print("detect(auto):", detect("auto").gpus)
print("detect(off):", detect("off").gpus)
PYEOF
timeout 900 "$PY" -m pytest -q -p no:cacheprovider -rs --timeout 600 \
    tests/test_gpu.py tests/test_warmup.py tests/test_engine_model.py tests/test_streamer.py \
    >"$OUT/tests.log" 2>&1 || { echo "tests failed (see tests.log)"; status=1; }
if grep -q "SKIPPED.*test_gpu.py" "$OUT/tests.log"; then
    echo "GPU tests skipped on a GPU machine (see tests.log)"
    status=1
fi

echo "== GPU benchmark"
timeout 1200 "$PY" bench/bench_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 \
    || { echo "bench failed (see bench.txt)"; status=1; }

{
    echo "status: $status"
    tail -n 3 "$OUT/tests.log"
    cat "$OUT/bench.txt"
} | tee "$OUT/summary.txt"
exit $status
