#!/usr/bin/env bash
# The GPU record: every benchmark, GPU test and soak whose output is kept in benchmarks/results/,
# run from the repository root on a CUDA machine (run on 4 H200s through the device tool):
#
#     bash benchmarks/run_gpu_record.sh OUT_DIR
#
# Four lanes; lane i runs on GPU (i mod #GPUs) and, with >= 64 cores, on its own 16 cores, so
# that torch.compile's workers in one lane do not slow another lane's Python thread. Lanes that
# share a GPU (fewer than 4 GPUs) run one after the other. Timings compare rows within one lane
# (one pytest run); the JSONs say which lane ran what.
# DEADLINE (seconds, default 540) bounds the whole run: the long property run gets what is left.
set -u
export OUT=${1:?output directory}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 START=$(date +%s)
export BENCH="python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider"
export GPU_TESTS="python -m pytest -m gpu -q -p no:cacheprovider"
GPUS=$(nvidia-smi -L | wc -l)
CORES=$(nproc)

lane0() {  # the C++ extension, the eager-mode rows, op rows and sweeps, then the C++ GPU tests
    SVPT_BUILD_EXT=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1
    touch "$OUT/.ext_built"
    $BENCH -k "not compiled" --benchmark-json="$OUT/bench_eager_mode.json"
    $GPU_TESTS tests/gpu/test_cpp_gpu.py 2>&1 | tail -n 40 > "$OUT/cpp_gpu_tests.txt"
}
lane1() {  # compiled rows at M=50 with the target rows of the same run, the Triton GPU tests, then
    # the long property run (4 pytest workers on this lane's GPU; its C++ rows need lane 0's build)
    $BENCH benchmarks/test_train_step.py -k "(compiled and M50) or floor or svpt-eager-M50 or svpt-triton-M50" \
        --benchmark-json="$OUT/bench_m50_targets.json"
    $GPU_TESTS tests/gpu/test_triton_gpu.py tests/gpu/test_fast_paths_gpu.py 2>&1 | tail -n 40 > "$OUT/triton_gpu_tests.txt"
    while [ ! -e "$OUT/.ext_built" ]; do sleep 5; done
    SVPT_GPU_EXAMPLES=${SVPT_GPU_EXAMPLES:-300} timeout $((START + ${DEADLINE:-540} - $(date +%s))) \
        python -m pytest tests/gpu/test_properties_gpu.py -m gpu -v -p no:cacheprovider -n 4 > "$OUT/properties_gpu_h200.txt" 2>&1
}
lane2() {  # compiled rows at M=10, the fast-path ratios and the step profiles
    $BENCH benchmarks/test_train_step.py -k "compiled and M10" --benchmark-json="$OUT/bench_m10_compiled.json"
    python benchmarks/fast_path_step.py "$OUT/fast_path_step_h200.json"
    python benchmarks/profile_step.py floor cvpt10 cvpt10-plain vpt-deep50 svpt50 svpt50-eager plain-svpt50 --out "$OUT/profile_step_h200.txt"
    python benchmarks/host_cprofile.py > "$OUT/host_cprofile_h200.txt" 2>&1
}
lane3() {  # the 5-minute soak, then the CVPT fold variants
    python benchmarks/soak.py --minutes 5 --batch-size 256 --out "$OUT/soak_h200.json" > "$OUT/soak_h200.txt" 2>&1
    python benchmarks/cvpt_fold_variants.py > "$OUT/cvpt_fold_variants_h200.txt" 2>&1
}

export -f lane0 lane1 lane2 lane3

run_lane() {
    local i=$1 pin=""
    if [ "$CORES" -ge 64 ]; then pin="taskset -c $((16 * i))-$((16 * i + 15))"; fi
    CUDA_VISIBLE_DEVICES=$((i % GPUS)) $pin bash -c "lane$i" > "$OUT/lane$i.log" 2>&1
}
for gpu in $(seq 0 $((GPUS < 4 ? GPUS - 1 : 3))); do
    (for i in 0 1 2 3; do if [ $((i % GPUS)) -eq "$gpu" ]; then run_lane "$i"; fi; done) &
done
wait
echo "lanes done; logs in $OUT"
