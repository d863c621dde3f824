#!/usr/bin/env bash
# The GPU checks, as one prepared script: under 8 minutes on one H100/H200.
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
# In two phases, each with its own time limit so that one that overruns never costs the other:
# 1. (to 260 s) every gpu test (pytest -m gpu), in GPU_SHARDS pytest processes side by side
#    (default: half the CPUs, at most 7; bench/gpu_shards.py splits them): what takes the time
#    is inductor compiling on the host's CPUs, not the card. The tests of bench/gpu_first.txt,
#    not yet seen passing on a GPU since their code changed (docs/gpu.md, "Checked on a GPU"),
#    start first in their shards. Beside them, `bench/gpu_bench.py --warm` compiles the bench's
#    compiled rows once, untimed, into inductor's on-disk caches.
# 2. (to 460 s) bench/gpu_bench.py alone on the card, its rows in the order of PLAN
#    (bench/gpu_plan.py): MTAN SegNet plain fp32 = the authors' computation, the shipped
#    recipe's step (bf16, fast, channels-last, inductor inside one CUDA graph), the step as a
#    graph without inductor, Split Wide, the Decathlon images/s and loading rows, then rows no
#    session has measured yet, every row of PLAN; a row whose expected seconds no longer fit is
#    skipped (and listed so) and a shorter one after it may still run (`bench/gpu_bench.py
#    --out DIR --budget 1200` measures them all in a longer session).
# One test at most 100 s where pytest-timeout is installed (a test's own timeout mark wins).
# Writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md (the tests folded in, and those a time
# limit left unrun), and OUT_DIR/gpu_tests.tgz: each shard's node ids, junit file and whole log.
set -u
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
START=$(date +%s)
cd "$(dirname "$0")/.."

left() { local n=$(( $1 - ($(date +%s) - START) )); [ "$n" -lt 30 ] && n=30; echo "$n"; }
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=100")
NPROC=$(nproc 2>/dev/null || echo 2)
# 7 on a 16-CPU H200 machine: 6 shards there took 117-225 s of the phase's 260 (2026-11-28), and
# the compiling test added since expects 150 s more
SHARDS=${GPU_SHARDS:-$(( NPROC / 2 > 7 ? 7 : (NPROC / 2 < 1 ? 1 : NPROC / 2) ))}

# SIGINT, not timeout's SIGTERM: a training run inside a test takes SIGTERM as "stop after this
# step" and goes on; SIGINT ends pytest, which still writes its junit report. While inductor
# compiles, SIGINT may not end it before the kill: then the -v lines of NAME.log (each test's
# result as it ends) stand in for the junit file in the report.
run_tests() {  # LIMIT NAME ARGS...: OUT_DIR/NAME.xml, the whole output in OUT_DIR/NAME.log
    local limit=$1 name=$2
    shift 2
    timeout -s INT -k 20 "$limit" $PY -m pytest -m gpu -v -p no:cacheprovider $PER_TEST \
        --junitxml="$OUT_DIR/$name.xml" "$@" >"$OUT_DIR/$name.log" 2>&1
}

# phase 1: the shards side by side; without a plan (collection failed), every gpu test in one.
# Nothing of an earlier run in OUT_DIR may pass for this one's.
rm -f "$OUT_DIR"/gpu_tests_shard* "$OUT_DIR"/gpu_tests.tgz "$OUT_DIR"/gpu_bench.json "$OUT_DIR"/gpu_bench.md \
    "$OUT_DIR"/gpu_bench_warm.json
if ! $PY bench/gpu_shards.py --shards "$SHARDS" --first bench/gpu_first.txt --out "$OUT_DIR" \
        >"$OUT_DIR/gpu_shards.log" 2>&1; then
    tail -5 "$OUT_DIR/gpu_shards.log"
    echo tests >"$OUT_DIR/gpu_tests_shard0.txt"
fi
LIMIT=$(left 260)
SHARD_PIDS=()
for plan in "$OUT_DIR"/gpu_tests_shard*.txt; do
    mapfile -t nodes <"$plan"  # node ids hold brackets: never through word splitting and globbing
    run_tests "$LIMIT" "$(basename "$plan" .txt)" "${nodes[@]}" &
    SHARD_PIDS+=($!)
done
# beside them, the bench's compiled rows compile once, untimed, into inductor's on-disk caches
# (so that the timed run need not compile from nothing); stopped when the tests end
timeout -k 10 "$LIMIT" $PY bench/gpu_bench.py --out "$OUT_DIR" --warm >"$OUT_DIR/bench_warm.log" 2>&1 &
WARM_PID=$!
wait "${SHARD_PIDS[@]}"
kill -TERM "$WARM_PID" 2>/dev/null
wait "$WARM_PID"
for log in "$OUT_DIR"/gpu_tests_shard*.log; do echo "$(basename "$log"): $(tail -1 "$log")"; done

timeout -k 10 "$(left 460)" $PY bench/gpu_bench.py --out "$OUT_DIR" --rows all \
    --budget "$(( $(left 460) - 15 ))" 2>&1 | tail -30 | tee "$OUT_DIR/bench.log"

# the report with the test results even when the bench was killed
$PY bench/gpu_report.py "$OUT_DIR"
# the shards' node ids, junit files and logs in one archive: a device's copy-back of OUT_DIR
# takes a limited count of files (8 of 24 came back on 2026-11-28)
(cd "$OUT_DIR" && tar czf gpu_tests.tgz gpu_tests_shard* && rm -f gpu_tests_shard*)
echo "gpu_check: $(( $(date +%s) - START )) s"
