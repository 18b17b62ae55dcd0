#!/usr/bin/env bash
# One device-machine session: GPU correctness tests, then the scan / model benchmark.
# Run from the repository root on a CUDA machine (no install needed):
#     [COMPILE=1] bash benchmarks/gpu_session.sh [extra bench_scan_gpu.py arguments]
# Writes logs and tables to $OUT (or ./gpu-out) and prints a summary last.
set -u
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Source checkout without installing: the package maps kernels/ and weights/ into vmamba_cli.
[ -e vmamba_cli/kernels ] || ln -s ../kernels vmamba_cli/kernels
[ -e vmamba_cli/weights ] || ln -s ../weights vmamba_cli/weights
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py=python3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

# Tests and the benchmark's kernel compiles run side by side (different processes, one cache).
start=$(date +%s)
xdist=""
$py -c "import xdist" 2>/dev/null && xdist="-n 6"
( VMAMBA_GPU_TESTS=1 timeout 300 $py -m pytest tests/test_gpu.py -q -p no:cacheprovider $xdist \
    > "$out/test_gpu.log" 2>&1; echo "test_gpu exit $?" >> "$out/test_gpu.log" ) &
tests_pid=$!
timeout 240 $py benchmarks/bench_scan_gpu.py --warm-jobs 8 --warm-only "$@" 2>/dev/null || true
wait $tests_pid
echo "tests + warm-up: $(( $(date +%s) - start )) s"
tail -n 25 "$out/test_gpu.log"
timeout 360 $py benchmarks/bench_scan_gpu.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
# Hardware counters of the hot kernels (Nsight Compute; runs where ncu can read the counters).
if [ "${NCU:-0}" = "1" ] && command -v ncu >/dev/null; then
    timeout 240 ncu --clock-control none -k 'regex:_scan_fwd_n1|_scan_bwd_n1|_cross_kernel' -c 10 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis \
        $py benchmarks/bench_scan_gpu.py --ncu-target > "$out/ncu.txt" 2>&1
    echo "ncu exit $?: $(wc -l < "$out/ncu.txt") lines in ncu.txt"
fi
# Training images/s, eager and torch.compile, vmamba-tiny against swin_t (#18's GPU check; compiles
# take minutes, so it runs only when asked).
if [ "${COMPILE:-0}" = "1" ]; then
    timeout 420 $py benchmarks/bench_compile_train.py --device cuda --batch 64 --steps 20 --json \
        2>&1 | tee "$out/compile_train.log"
fi
