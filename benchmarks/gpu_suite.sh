#!/usr/bin/env bash
# The GPU suite: everything that needs the lent GPU machine, in ONE device call (<= 10 minutes).
#
#   ../shared/device/stage.sh                      # here, once: stages the wheels into .device/
#   device run, carry [".device"], command:  bash benchmarks/gpu_suite.sh
#
# Steps (each logs to $OUT and the suite goes on when one fails; exit status = first failure):
#   1. install the staged DeepSpeed wheels into /tmp/site (PYTHONPATH=$PWD:/tmp/site)
#   2. build fftrainer_ds._C with the CUDA kernels (sm_90 only, to keep the build short)
#   3. pytest -m gpu tests/gpu                    -> $OUT/pytest_gpu.txt
#   4. kernel bandwidth vs pinned D2H copy_       -> $OUT/gpu_pack_bandwidth.{txt,json}
#   5. step overhead, 735M GPT ZeRO-2 bf16        -> $OUT/gpu_overhead.{txt,json,md}
# SUITE_STEPS="build test bench overhead" selects steps; written for torch 2.11 cu130, Python 3.12.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fftrainer_gpu_suite}
mkdir -p "$OUT"
STEPS=${SUITE_STEPS:-"build test bench overhead"}
status=0
note() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
fail() { note "FAILED: $*"; [ "$status" -ne 0 ] || status=1; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl && export PYTHONPATH=$PWD:/tmp/site || { note "staged wheels missing (.device)"; exit 2; }
{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
note "env: $(tail -1 "$OUT/env.txt")"

if want build; then
    note "build: FFTRAINER_BUILD_CUDA=1 pip install -e ."
    export FFTRAINER_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    if ! timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
        note "pip -e failed; trying setup.py build_ext --inplace"
        timeout 300 python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || fail "build (see build.log)"
    fi
    python3 -c "import torch; from fftrainer_ds import _C; assert _C.has_cuda(), 'built without CUDA'; \
print('_C has CUDA kernels')" >> "$OUT/build.log" 2>&1 || fail "_C import / has_cuda"
    tail -3 "$OUT/build.log" | tee -a "$OUT/suite.log"
fi

if want test; then
    note "tests: pytest -m gpu tests/gpu"
    timeout 240 python3 -m pytest -q -ra -m gpu tests/gpu -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1 \
        || fail "pytest -m gpu"
    tail -15 "$OUT/pytest_gpu.txt" | tee -a "$OUT/suite.log"
fi

if want bench; then
    note "bench: kernel bandwidth vs pinned D2H"
    timeout 180 python3 benchmarks/gpu_pack_bandwidth.py --out "$OUT" > "$OUT/gpu_pack_bandwidth.txt" 2>&1 \
        || fail "gpu_pack_bandwidth"
    cat "$OUT/gpu_pack_bandwidth.txt" | tail -40 | tee -a "$OUT/suite.log"
fi

if want overhead; then
    note "overhead: snapshot_overhead.py --device cuda"
    OUT="$OUT" timeout 420 python3 benchmarks/snapshot_overhead.py --device cuda > "$OUT/gpu_overhead.txt" 2>&1 \
        || fail "snapshot_overhead --device cuda"
    grep -E "overhead|GB|Error|error" "$OUT/gpu_overhead.txt" | tail -30 | tee -a "$OUT/suite.log"
fi

note "done, status $status; results in $OUT"
exit $status
