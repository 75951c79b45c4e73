#!/usr/bin/env bash
# The GPU figures the open issues are measured by, in one device call on 4 H200s (device tool,
# kind nvidia-h200-x4), from the repository root:
#
#     DEADLINE=560 bash benchmarks/run_gpu_record.sh OUT_DIR
#
# or, where one GPU is lent (kind nvidia-h200), one lane per device call, e.g. lane 1:
#
#     DEADLINE=560 bash benchmarks/run_gpu_record.sh OUT_DIR 1
#
# (the 19-task total is then the sum of the wall times in lane 2's vtab_timing_suite_part1.json and
# lane 3's vtab_timing_suite_part2.json; this script writes it only when one OUT_DIR holds both).
#
# Four lanes, lane i on GPU (i mod #GPUs) and, with >= 64 cores, on its own 16 cores, so that
# one lane's loader workers or compiler processes do not slow another lane's Python thread.
# Lanes that share a GPU (fewer than 4 GPUs) run one after the other. Every ratio the README
# states compares rows of one script run, inside one lane. DEADLINE (seconds, default 560)
# bounds each lane; what a lane finished is in OUT_DIR, its log in laneN.log.
#   lane 0  the GPU tests of the Triton and eager backends, svpt train's eager and graph steps
#   lane 1  the token floor at 224, not compiled and compiled, then at 512 (issue 14)
#   lane 2  svpt vtab over tasks 1-10 (issue 15)
#   lane 3  svpt vtab over tasks 11-19, then the single-task timing (a first and a second process)
# The 19-task total is the sum of the two parts (vtab_timing_suite_total.json). The C++/CUDA
# figures (issue 18) come from benchmarks/cpp_cuda_step.py after building the extension's CUDA
# kernels (its docstring); the segmentation step from benchmarks/segmentation_step.py.
set -u
export OUT=${1:?output directory}
ONLY=${2:-}  # one lane (0-3), or all four
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 START=$(date +%s) DEADLINE=${DEADLINE:-560}
GPUS=$(nvidia-smi -L | wc -l)
CORES=$(nproc)

left() { echo $((START + DEADLINE - $(date +%s))); }  # seconds this lane may still run
export -f left

lane0() {
    timeout "$(left)" python -m pytest -q -p no:cacheprovider tests/gpu -k "not cpp" > "$OUT/gpu_tests_h200.txt" 2>&1
    timeout "$(left)" python benchmarks/cuda_graph_step.py "$OUT/cuda_graph_step_h200.json"
}
lane1() {
    timeout "$(left)" python benchmarks/token_floor.py --out "$OUT/token_floor_h200"
    timeout "$(left)" python benchmarks/token_floor.py --img 512 --batch 16 --rows token-floor,plain-svpt,svpt \
        --out "$OUT/token_floor_512_h200"
}
lane2() {
    timeout "$(left)" python benchmarks/vtab_timing.py suite "$OUT" --part 1/2 --work runs/vtab_timing_a \
        --budget-s "$(left)"
}
lane3() {
    timeout "$(left)" python benchmarks/vtab_timing.py suite "$OUT" --part 2/2 --work runs/vtab_timing_b \
        --budget-s "$(left)"
    timeout "$(left)" python benchmarks/vtab_timing.py single "$OUT" --work runs/vtab_timing_b --no-bare-step \
        --budget-s 90
}
export -f lane0 lane1 lane2 lane3

run_lane() {
    local i=$1 pin=""
    if [ "$CORES" -ge 64 ]; then pin="taskset -c $((16 * i))-$((16 * i + 15))"; fi
    CUDA_VISIBLE_DEVICES=$((i % GPUS)) $pin bash -c "lane$i" > "$OUT/lane$i.log" 2>&1
}
if [ -n "$ONLY" ]; then
    run_lane "$ONLY"
else
    for gpu in $(seq 0 $((GPUS < 4 ? GPUS - 1 : 3))); do
        (for i in 0 1 2 3; do if [ $((i % GPUS)) -eq "$gpu" ]; then run_lane "$i"; fi; done) &
    done
    wait
fi
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [out / "vtab_timing_suite_part1.json", out / "vtab_timing_suite_part2.json"]
if all(p.exists() for p in parts):
    runs = [json.loads(p.read_text()) for p in parts]
    total = {"parts": [{"tasks": r["tasks"], "wall_s": r["wall_s"], "rc": r["rc"]} for r in runs],
             "total_19_tasks_wall_s": sum(r["wall_s"] for r in runs)}
    (out / "vtab_timing_suite_total.json").write_text(json.dumps(total, indent=2))
    print(f"svpt vtab, 19 tasks in two parts on two GPUs: {total['total_19_tasks_wall_s']:.1f} s")
EOF
echo "lanes done; logs in $OUT"
