# Sourced by the GPU-box drivers (run_linear.sh, run_e2e.sh) from the repo root: install the carried wheels of the
# folders given as arguments into /tmp/site, put it and the repo on PYTHONPATH, and write the card and versions to
# $OUT/env.txt.
OUT=${OUT:-/tmp/pq_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
for d in "$@"; do
  if ls "$d"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$d"/*.whl
  fi
done
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv;
  python3 -c 'import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)'
  python3 -c 'import torchao; print("torchao", torchao.__version__)'; } 2>&1 | tee "$OUT/env.txt"
