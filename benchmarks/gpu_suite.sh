#!/usr/bin/env bash
# The GPU suite: everything that needs the lent GPU machine, in ONE device call (<= 10 minutes).
#
#   ../shared/device/stage.sh                      # here, once: stages the wheels into .device/
#   device run, carry [".device"], timeout_s 600, command:  bash benchmarks/gpu_suite.sh
#
# The GPU image has torch (CUDA), triton, ninja, pybind11, nvcc; DeepSpeed comes from the staged wheels.
# Steps (each logs to $OUT, the suite goes on when one fails; exit status = 1 if any failed):
#   1. install the staged DeepSpeed wheels into /tmp/site (PYTHONPATH=$PWD:/tmp/site)
#   2. build fftrainer_ds._C once, with the CUDA kernels (sm_90 only, to keep the build short)
#   3. pytest -m gpu tests/gpu: kernels vs reference, CudaPacker, GPU restore of fp16/bf16 engines
#                                                 -> $OUT/pytest_gpu.txt
#   4. kernel bandwidth: pack+checksum+D2H into pinned vs a plain pinned copy_, same run
#                                                 -> $OUT/gpu_pack_bandwidth.{txt,json}
#   5. step overhead through fftrainer_ds.initialize, 735M GPT bf16, ZeRO-2 then ZeRO-3: the 0.55 GB
#      shard at every step, and the whole state under "auto" (prints the RPO); paired blocks, median
#      of 3 pairs                                 -> $OUT/gpu_overhead.{txt,jsonl,md}
# The steps share one deadline (SUITE_BUDGET_S, default 570 s from the start): each gets at most its
# own cap and what is left, so the call ends inside the device tool's 600 s with every result so far.
# SUITE_STEPS="build test bench overhead2 overhead3" selects steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fftrainer_gpu_suite}
mkdir -p "$OUT"
STEPS=${SUITE_STEPS:-"build test bench overhead2 overhead3"}
DEADLINE=$(( $(date +%s) + ${SUITE_BUDGET_S:-570} ))
status=0
note() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
fail() { note "FAILED: $*"; status=1; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# seconds a step may take: its cap, or what is left before the deadline (0: skip it)
budget() { local left=$(( DEADLINE - $(date +%s) )); (( left < 15 )) && left=0; (( left > $1 )) && left=$1; echo $left; }
run_step() {  # run_step NAME CAP LOGFILE CMD...: the command under its budget, output to LOGFILE
    local name=$1 cap=$2 log=$3; shift 3
    local t; t=$(budget "$cap")
    if (( t == 0 )); then fail "$name: skipped, no time left before the deadline"; return; fi
    note "$name (up to ${t}s): $*"
    timeout "$t" "$@" > "$log" 2>&1 || fail "$name (exit $?, see $(basename "$log"))"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl && export PYTHONPATH=$PWD:/tmp/site || { note "staged wheels missing (.device)"; exit 2; }
{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name())"; python3 -c "import triton; print('triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
note "env: $(tail -2 "$OUT/env.txt" | tr '\n' ' ')"

if want build; then
    export FFTRAINER_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    run_step build 300 "$OUT/build.log" python3 -m pip install --no-build-isolation --no-deps -e .
    python3 -c "import torch; from fftrainer_ds import _C; assert _C.has_cuda(), 'built without CUDA'; \
print('_C has CUDA kernels')" >> "$OUT/build.log" 2>&1 || fail "_C import / has_cuda"
    tail -3 "$OUT/build.log" | tee -a "$OUT/suite.log"
fi

if want test; then
    run_step "pytest -m gpu" 180 "$OUT/pytest_gpu.txt" python3 -m pytest -q -ra -m gpu tests/gpu -p no:cacheprovider
    tail -15 "$OUT/pytest_gpu.txt" | tee -a "$OUT/suite.log"
fi

if want bench; then
    run_step "kernel bandwidth" 100 "$OUT/gpu_pack_bandwidth.txt" \
        python3 benchmarks/gpu_pack_bandwidth.py --out "$OUT" --reps 5
    tail -40 "$OUT/gpu_pack_bandwidth.txt" | tee -a "$OUT/suite.log"
fi

for stage in 2 3; do
    want "overhead$stage" || continue
    run_step "step overhead ZeRO-$stage" 150 "$OUT/gpu_overhead_z$stage.txt" \
        python3 benchmarks/_gpu_overhead.py --stage "$stage" --pairs 3 --out "$OUT"
    grep -E "^ZeRO|Error|error" "$OUT/gpu_overhead_z$stage.txt" | tail -10 | tee -a "$OUT/suite.log"
done
[ -f "$OUT/gpu_overhead.md" ] && cat "$OUT/gpu_overhead.md" | tee -a "$OUT/suite.log"

note "done, status $status; results in $OUT"
exit $status
