"""Without a GPU, run the Triton kernel tests under Triton's CPU interpreter, in a fresh process.

`triton.jit` picks interpreter or compiled mode when a kernel is decorated (TRITON_INTERPRET at import time), and
triton's own library functions are decorated when triton is imported. Setting the variable inside this test
session would be too late for modules already imported and would leak into every later import, so the kernel tests
run in a child pytest with TRITON_INTERPRET=1 from the start. (By hand: `TRITON_INTERPRET=1 pytest
tests/kernels/triton`.) With a GPU the kernel tests run compiled, in this session, and this test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pq_ao.kernels.triton._common import interpreting

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run compiled")
@pytest.mark.skipif(interpreting(), reason="already inside the interpreter run")
def test_kernels_under_triton_interpreter():
    files = sorted(str(p) for p in HERE.glob("test_triton_*.py") if p.name != Path(__file__).name)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
