#!/usr/bin/env bash
# One device call's worth of GPU work: the gpu-marked tests, then the op benchmark case by
# case, everything logged under $OUT so that a call cut off at its time limit still returns
# what finished. Usage on the lent GPU (from the repo root, fla wheels carried in .whl/):
#
#   GDN_COMMIT=<commit> bash benchmarks/gpu_session.sh [tests|bench|sweep|stages|all] [case ...]
#
# Budget from the first session with the Triton kernels (cold H100, Triton 3.6): the gpu
# tests take ~6-9 min (mostly compiling ~10 kernels per dtype/flag combination); one
# benchmark case with triton, fla and sdpa ~2.5 min cold, ~1 min warm. Keep each call under
# 10 minutes: run "tests" and "bench" in separate calls.
set -uo pipefail
what=${1:-all}
shift || true
out=${OUT:-/tmp/gdn-gpu}
mkdir -p "$out/results"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1

if [ "$what" = tests ] || [ "$what" = all ]; then
    # -v: each test's result is in the log as it finishes, even if the call is cut off.
    python3 -m pytest -m gpu -v -p no:cacheprovider --durations=20 tests 2>&1 \
        | tee "$out/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi
if [ "$what" = stages ]; then
    # The switched-off candidates of NOTES.md §4-5 beside the default, kernel by kernel.
    python3 benchmarks/stages.py --out "$out/stages" | head -14
    GDN_TRITON_FUSED_WY_BACKWARD=1 python3 benchmarks/stages.py --tag fused \
        --out "$out/stages" | head -14
    python3 benchmarks/stages.py --shape 1,65536,16,128,128 --out "$out/stages" | head -3
    GDN_TRITON_SEGMENT_CHUNKS=16 python3 benchmarks/stages.py --shape 1,65536,16,128,128 \
        --tag seg16 --out "$out/stages" | head -3
fi
if [ "$what" = sweep ]; then
    # RELIABILITY.md item 1 for the kernels: 200 configs, float32 exact and bfloat16.
    python3 benchmarks/accuracy.py --backend triton --device cuda 2>&1 | tail -12
    cp benchmarks/results/accuracy/*-triton.json "$out/results/" 2>/dev/null
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    cases=("$@")
    if [ ${#cases[@]} -eq 0 ]; then
        cases=(8x4096-h16 1x65536-h16 8x4096-h6-k256v512 8x4096-h16-deltanet
               8x4096-h16-gla 2x16384-h16 8x4096-h32 8x4096-h16-gva32)
    fi
    for case in "${cases[@]}"; do
        timeout 300 python3 benchmarks/ops.py --shapes "$case" --backends triton,fla,sdpa \
            --tag "$case" --out "$out/results" 2>&1 | grep -E "^\| [0-9]|skip|Error"
    done
fi
