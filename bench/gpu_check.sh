#!/usr/bin/env bash
# The GPU checks, as one prepared script: under 8 minutes on one H100/H200.
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
# 1. the gpu tests (pytest -m gpu: the CUDA-graph step's, the short ones in other test files,
#    then tests/test_gpu.py; at most 200 s, one test at most 100 s where pytest-timeout is
#    installed; tests not reached in time are missing from the report's counts);
# 2. bench/gpu_bench.py, its rows in the order of PLAN (MTAN SegNet plain fp32 = the authors'
#    computation, plain bf16, fast bf16, mtlkit's own step of the shipped recipe eager and
#    as one CUDA graph (training.cuda_graph), then the same under CUDA graphs (compile mode
#    reduce-overhead), Split Wide, the Decathlon WRN-28-4 MTAN images/s and data loading, then
#    the rest) in the time left: a row that would start late is listed as skipped
#    (`bench/gpu_bench.py --out DIR --budget 1200` measures them all in a longer session).
# 3. if time is left, bench/weighting_step.py on CUDA: exact (host) against device solvers.
# Writes OUT_DIR/gpu_bench.json, OUT_DIR/gpu_bench.md (tests folded in), weighting_solvers.md
# and the logs.
set -u
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
START=$(date +%s)
cd "$(dirname "$0")/.."

# pytest-timeout, where installed, fails one stuck test instead of losing the whole report
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=100")
# the short gpu checks of the other test files first (seconds each), then tests/test_gpu.py
# (the CUDA-graph step's checks first: the newest)
GPU_FILES="tests/test_graph_step.py $(grep -l 'mark.gpu' tests/test_*.py | grep -v -e '^tests/test_gpu.py$' \
    -e '^tests/test_graph_step.py$' | tr '\n' ' ') tests/test_gpu.py"
# SIGINT, not timeout's SIGTERM: a training run inside a test takes SIGTERM as "stop after this
# step" and goes on; SIGINT ends pytest, which still writes its junit report
timeout -s INT -k 20 200 $PY -m pytest -m gpu -q $GPU_FILES -p no:cacheprovider $PER_TEST --junitxml="$OUT_DIR/gpu_tests.xml" \
    2>&1 | tail -40 | tee "$OUT_DIR/gpu_tests.log"
# the bench stops starting rows 70 s before the 420 s mark (a compiled row takes up to a minute)
LEFT=$(( 420 - ($(date +%s) - START) ))
[ "$LEFT" -lt 100 ] && LEFT=100  # the tests overran: the bench's first rows all the same
timeout "$LEFT" $PY bench/gpu_bench.py --out "$OUT_DIR" --rows all --budget $(( LEFT - 70 )) \
    --tests-junit "$OUT_DIR/gpu_tests.xml" 2>&1 | tail -60 | tee "$OUT_DIR/bench.log"
# 3. in what is left: the gradient-level methods' exact solvers (one read per step) against
#    solver = "device" (none), on the CUDA step (bench/weighting_step.py)
LEFT=$(( 430 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 45 ]; then
    timeout $(( LEFT - 5 )) $PY bench/weighting_step.py --device cuda --workloads segnet-mtan-half \
        --half-size 288x384 --rounds 3 --weightings mgda,upgrad,imtl_g,nash_mtl 2>&1 | tail -25 \
        | tee "$OUT_DIR/weighting_solvers.md"
fi
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
res["tests"] = junit_summary(out / "gpu_tests.xml")
path.write_text(json.dumps(res, indent=2))
(out / "gpu_bench.md").write_text(markdown(res))
print(markdown(res))
PYEOF
echo "gpu_check: $(( $(date +%s) - START )) s"
