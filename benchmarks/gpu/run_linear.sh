#!/usr/bin/env bash
# One GPU-box call for the linear kernels (issue 4): GPU tests, memory-bound kernel bandwidth, tuning sweep +
# linear benchmark. Run from the repo root on the box, with `.whl_linear` carried (the torchao wheel: the
# torchao baseline needs it, and so does `import pq_ao`):
#   bash benchmarks/gpu/run_linear.sh            # everything; outputs land in $OUT
# Stages are time-boxed so the whole run stays under the 10-minute command limit.
set -uo pipefail
source benchmarks/gpu/box_setup.sh .whl_linear
STAGES=${STAGES:-tests,kernels,linear}
if [[ $STAGES == *tests* ]]; then
  echo "== GPU tests"; timeout ${TEST_S:-170} python3 -m pytest -q -p no:cacheprovider -n 12 tests/kernels/triton \
    --maxfail=30 ${TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1; tail -40 "$OUT/gpu_tests.log"
fi
if [[ $STAGES == *kernels* ]]; then
  echo "== memory-bound kernels"; timeout ${KERNELS_S:-60} python3 benchmarks/gpu/bench_kernels.py --out "$OUT" 2>&1 \
    | tee "$OUT/kernels.log" | tail -60
fi
if [[ $STAGES == *linear* ]]; then
  echo "== linear: tune + benchmark"; timeout ${LINEAR_S:-330} python3 benchmarks/bench_linear.py --out "$OUT" \
    ${LINEAR_ARGS:---tune --tune-budget-s 110 --budget-s 170} > "$OUT/linear.log" 2>&1
  echo "linear rc=$?"; grep -E "BEST|error|Error|ceilings" "$OUT/linear.log" | tail -30; tail -c 6000 "$OUT"/linear_*.md 2>/dev/null
fi
