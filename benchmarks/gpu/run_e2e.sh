#!/usr/bin/env bash
# One GPU-box call for the end-to-end tables (issues 15 and 16): the GPU tests of the model code, then
# `bench_e2e.py` with each model in its own process, one after the other (never side by side: another process's
# compile autotunes on the GPU and disturbs the timing). Run from the repo root on the box with the torchao wheel
# carried in `.whl_a` (the fp8row / int4wo peers need it; so does `import pq_ao`):
#   STEPS="tests static:prefill,decode_b1" bash benchmarks/gpu/run_e2e.sh
#   STEPS="bf16_gqa:prefill,decode_b1 fp8row:prefill int4wo:decode_b1,prefill" bash benchmarks/gpu/run_e2e.sh
# A step is `tests`, `attention` (bench_prefix_attention.py), `gemv` (bench_kernels.py --gemv GEMVS), `kernels` (bench_kernels.py with a sweep of the
# Hadamard row loop's settings, ROW_LOOPS, at KERNEL_MS rows of KERNEL_KS elements, KERNEL_NAMES only; ATTENTION_ARGS passes
# e.g. "--t 2048 --rows slots_keep,slots_sdpa_gqa" to the attention step) or `<model>:<stages>`. `<MODEL>_S` (e.g. STATIC_S=400)
# time-boxes a model's process (CHECK=1: the static prefill's paths compared, bench_e2e --check), TEST_S the tests (TEST_ENV: variables for them alone, e.g. CUDA_LAUNCH_BLOCKING=1), KERNELS_S the kernels, ATTENTION_S the attention.
# Outputs land in $OUT: e2e_<model>.json (the profiles inside), <model>.log, gpu_tests.log, kernels.log, env.txt.
set -uo pipefail
source benchmarks/gpu/box_setup.sh .whl_a .whl
# inductor's generated modules of the step just run (every kernel's source: what it fused, its tiles and warps) go to
# $OUT/inductor_code_<name>.tgz; the cache is emptied so the next step's modules are its own
keep_inductor_code() {
  local cache_dir=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(whoami)}
  grep -rl --include=*.py "async_compile.triton(" "$cache_dir" 2>/dev/null | xargs -r ls -t | head -8 \
    | tar czf "$OUT/inductor_code_$1.tgz" -T - 2>/dev/null; rm -rf "$cache_dir"
}
for step in ${STEPS:-tests static:prefill,decode_b1}; do
  if [[ $step == tests ]]; then
    echo "== GPU tests"
    env ${TEST_ENV:-} timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -n 12 -m gpu ${TEST_PATHS:-tests/nn tests/tensors tests/kernels} \
      > "$OUT/gpu_tests.log" 2>&1
    echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -25
    # a timed-out run's xdist workers can outlive it (14.7 GiB still on the GPU when the next model started, its
    # decode timing disturbed): wait for the GPU to be free, then kill what still holds it
    for _ in $(seq 30); do [[ -z $(nvidia-smi --query-compute-apps=pid --format=csv,noheader) ]] && break; sleep 1; done
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
    continue
  fi
  if [[ $step == kernels ]]; then
    echo "== memory-bound kernels (Hadamard row-loop sweep)"
    timeout ${KERNELS_S:-90} python3 benchmarks/gpu/bench_kernels.py --out "$OUT" --row-loops ${ROW_LOOPS:-2:8:32,1:8:32,3:8:32,2:8:64,2:4:32,2:8:16} --ms ${KERNEL_MS:-1,2048} --ks ${KERNEL_KS:-4096,14336} ${KERNEL_NAMES:+--kernels $KERNEL_NAMES} \
      > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "hadamard|copy|Error" "$OUT/kernels.log" | tail -40
    continue
  fi
  if [[ $step == gemv ]]; then
    echo "== decode GEMV settings"
    timeout ${GEMV_S:-90} python3 benchmarks/gpu/bench_kernels.py --out "$OUT" \
      --gemv ${GEMVS:-0:1024:4:3,16:1024:4:3,8:1024:4:3,8:512:4:3,8:1024:4:4} \
      > "$OUT/gemv.log" 2>&1
    echo "gemv rc=$?"; grep -E "gemv|Error" "$OUT/gemv.log" | tail -60
    continue
  fi
  if [[ $step == attention ]]; then
    echo "== prefill attention with a prefix"
    timeout ${ATTENTION_S:-150} python3 benchmarks/gpu/bench_prefix_attention.py --json "$OUT/prefix_attention.json" ${ATTENTION_ARGS:-} \
      > "$OUT/attention.log" 2>&1
    echo "attention rc=$?"; cut -c1-220 "$OUT/attention.log" | grep -vE "^\s*$|Warning|warn" | tail -30
    keep_inductor_code attention
    continue
  fi
  model=${step%%:*}; stages=${step#*:}
  limit_var=$(echo "${model}_S" | tr a-z A-Z); limit=${!limit_var:-300}
  echo "== $model ($stages, at most ${limit}s); GPU memory used before: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
  t0=$(date +%s)
  timeout $limit python3 benchmarks/bench_e2e.py --models $model --stages $stages --profile ${CHECK:+--check} --budget-s $limit \
    --json "$OUT/e2e_$model.json" > "$OUT/$model.log" 2>&1
  echo "$model rc=$? in $(( $(date +%s) - t0 ))s"; grep -E "^\| $model |Error|error:" "$OUT/$model.log" | tail -8
  keep_inductor_code "$model"
done
