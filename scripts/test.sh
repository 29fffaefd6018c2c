#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on the CPU, as two visible selections:
#   1. every test except the Triton kernel tests (which need a GPU or the interpreter);
#   2. the Triton kernel tests under Triton's CPU interpreter (TRITON_INTERPRET=1 from the start of the process:
#      `triton.jit` reads it when a kernel is decorated).
# Extra args go to both pytest runs. The default tier leaves out tests marked slow; `bash scripts/test.sh -m slow`
# runs the second tier (real SmolLM2-135M end to end, CPU AOT compiles): run it before changing the export path.
# With a GPU, selection 1 runs the kernel tests compiled and selection 2 is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
status=0
echo "== tests (CPU)"
"${PYTEST[@]}" "$@" || status=1
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== Triton kernel tests ran compiled above (CUDA present)"
else
    echo "== Triton kernel tests under TRITON_INTERPRET=1"
    TRITON_INTERPRET=1 "${PYTEST[@]}" tests/kernels/triton "$@"
    rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1  # 5: nothing selected (e.g. -m slow)
fi
exit $status
