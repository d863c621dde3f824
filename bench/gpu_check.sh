#!/usr/bin/env bash
# The GPU checks, as one prepared script: under 8 minutes on one H100/H200.
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
# 1. bench/gpu_bench.py eager rows: MTAN SegNet (plain / fast / memory_efficient, fp32 / bf16,
#    the shipped fast + channels-last + bf16), Split Wide, Decathlon WRN-28-4 MTAN images/s,
#    data loading images/s;
# 2. the gpu tests (pytest -m gpu tests/test_gpu.py), results folded into the report;
# 3. the torch.compile rows, in the time that is left.
# Writes OUT_DIR/gpu_bench.json, OUT_DIR/gpu_bench.md and the logs.
set -u
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
START=$(date +%s)
cd "$(dirname "$0")/.."

timeout 150 $PY bench/gpu_bench.py --out "$OUT_DIR" --rows eager --budget 110 2>&1 | tee "$OUT_DIR/bench_eager.log"
# pytest-timeout, where installed, fails one stuck test instead of losing the whole report
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=100")
timeout 210 $PY -m pytest -m gpu -q tests/test_gpu.py -p no:cacheprovider $PER_TEST --junitxml="$OUT_DIR/gpu_tests.xml" \
    2>&1 | tail -40 | tee "$OUT_DIR/gpu_tests.log"
LEFT=$(( 450 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 40 ]; then
    timeout "$LEFT" $PY bench/gpu_bench.py --out "$OUT_DIR" --rows compiled --budget $(( LEFT - 40 )) \
        --tests-junit "$OUT_DIR/gpu_tests.xml" 2>&1 | tail -5 | tee "$OUT_DIR/bench_compiled.log"
fi
# the report with the test results even when the compiled rows were killed or not started
$PY - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_bench import junit_summary, markdown
out = Path(sys.argv[1])
res = json.loads((out / "gpu_bench.json").read_text())
res["tests"] = junit_summary(out / "gpu_tests.xml")
(out / "gpu_bench.json").write_text(json.dumps(res, indent=2))
(out / "gpu_bench.md").write_text(markdown(res))
print(markdown(res))
PYEOF
echo "gpu_check: $(( $(date +%s) - START )) s"
