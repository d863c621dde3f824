#!/usr/bin/env bash
# Rows of bench/gpu_bench.py's PLAN that a gpu_check.sh run left unmeasured, each in its own
# process at once: what makes a compiled row slow to measure is inductor compiling on the host's
# CPUs (120-150 s cold on an H200 machine), so the rows compile side by side and take turns on
# the card for their timed steps (gpu_bench.py --gpu-lock: the timed steps hold an exclusive
# lock, so no two rows' timed steps share the card; other rows' compiling still loads the CPUs).
#   bench/gpu_rows.sh OUT_DIR PEAKS_JSON LIMIT_S ROW...
# ROW: a 0-based index into PLAN; PEAKS_JSON: gpu_bench.json of a whole run on the same card
# (its GEMM peaks are the TFLOP/s rows' yardstick; give row 0, the baseline, for the ratios).
# Writes OUT_DIR/gpu_bench.json and .md (the rows merged, in PLAN's order) and
# OUT_DIR/gpu_rows.tgz (each row's log and results); each process ends after LIMIT_S seconds.
# GPU_LOCK: the lock file (default OUT_DIR/rows/card.lock); another job that must not share the
# card with a timed step can hold it too (flock(1) takes the same lock).
set -u
OUT_DIR=$1 PEAKS=$2 LIMIT=$3
shift 3
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
PARTS="$OUT_DIR/rows"
rm -rf "$PARTS" "$OUT_DIR/gpu_bench.json" "$OUT_DIR/gpu_bench.md" "$OUT_DIR/gpu_rows.tgz"
mkdir -p "$PARTS"
# inductor's compile workers: a few per process, not one per CPU in each of them
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} PYTHONUNBUFFERED=1
# each process a share of the card's memory: cuDNN's autotuning alone took up to 58 GB in one
# row's warm-up on an H200, and twelve rows side by side ran out of memory without a cap (its
# choice of kernels is then limited to workspaces within the share: the report notes the cap)
FRACTION=$($PY -c "print(round(0.9 / $#, 4))")
pids=() dirs=()
for row in "$@"; do
    timeout -k 10 "$LIMIT" $PY bench/gpu_bench.py --out "$PARTS/row$row" --only "$row" \
        --gpu-lock "${GPU_LOCK:-$PARTS/card.lock}" --memory-fraction "$FRACTION" >"$PARTS/row$row.log" 2>&1 &
    pids+=($!) dirs+=("$PARTS/row$row")
done
wait "${pids[@]}"
$PY bench/gpu_report.py --merge "$OUT_DIR" "$PEAKS" "${dirs[@]}"
tar czf "$OUT_DIR/gpu_rows.tgz" -C "$OUT_DIR" rows && rm -rf "$PARTS"
