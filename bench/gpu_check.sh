#!/usr/bin/env bash
# The GPU checks, as one prepared script: under 8 minutes on one H100/H200.
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
# In three phases, most telling first, each with its own time limit so that one that
# overruns never costs the others:
# 1. (to 240 s) the gpu tests listed in bench/gpu_first.txt: those not yet seen passing on a
#    GPU since their code changed (docs/gpu.md, "Checked on a GPU"; today three);
# 2. (to 420 s) bench/gpu_bench.py's first rows of PLAN: MTAN SegNet plain fp32 = the authors'
#    computation, the shipped recipe's step (bf16, fast, channels-last, inductor inside one
#    CUDA graph), the step as a graph without inductor, Split Wide (then the Decathlon
#    images/s and loading rows), then rows no session has measured yet; a row that would
#    start late is listed as skipped (`bench/gpu_bench.py --out DIR --budget 1200` measures
#    them all in a longer session);
# 3. (to 470 s) the other gpu tests (pytest -m gpu), short files first, tests/test_gpu.py last.
# One test at most 100 s where pytest-timeout is installed (a test's own timeout mark wins).
# Writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md (the tests of both test phases
# folded in), the junit files and the logs.
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
FIRST=$(grep -v '^#' bench/gpu_first.txt | tr '\n' ' ')

# SIGINT, not timeout's SIGTERM: a training run inside a test takes SIGTERM as "stop after this
# step" and goes on; SIGINT ends pytest, which still writes its junit report. While inductor
# compiles, SIGINT may not end it before the kill: then the -v lines of NAME.log (each test's
# result as it ends) stand in for the junit file in the report.
run_tests() {  # LIMIT NAME ARGS...: OUT_DIR/NAME.xml, the whole output in OUT_DIR/NAME.log
    local limit=$1 name=$2
    shift 2
    timeout -s INT -k 20 "$limit" $PY -m pytest -m gpu -v -p no:cacheprovider $PER_TEST \
        --junitxml="$OUT_DIR/$name.xml" "$@" >"$OUT_DIR/$name.log" 2>&1
    tail -30 "$OUT_DIR/$name.log"
}

run_tests "$(left 240)" gpu_tests_first $FIRST

timeout -k 10 "$(left 420)" $PY bench/gpu_bench.py --out "$OUT_DIR" --rows all --first 12 \
    --budget "$(( $(left 420) - 100 ))" 2>&1 | tail -30 | tee "$OUT_DIR/bench.log"

GPU_FILES="$(grep -l 'mark.gpu' tests/test_*.py | grep -v '^tests/test_gpu.py$' | tr '\n' ' ') tests/test_gpu.py"
DESELECT=$(for t in $FIRST; do echo "--deselect $t"; done)
run_tests "$(left 470)" gpu_tests_rest $GPU_FILES $DESELECT

# the report with the test results even when the bench was killed
$PY - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_bench import junit_summary, markdown
out = Path(sys.argv[1])
path = out / "gpu_bench.json"
res = json.loads(path.read_text()) if path.exists() else {"gpu": "?", "torch": "?", "cpu": "?", "rows": [],
                                                          "bf16_gemm_tflops": float("nan"), "fp32_gemm_tflops": float("nan")}
res["tests"] = junit_summary(out / "gpu_tests_first.xml", out / "gpu_tests_rest.xml")
path.write_text(json.dumps(res, indent=2))
(out / "gpu_bench.md").write_text(markdown(res))
print(markdown(res))
PYEOF
echo "gpu_check: $(( $(date +%s) - START )) s"
