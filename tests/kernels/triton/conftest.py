"""The Triton kernel tests run compiled on a GPU, or under Triton's CPU interpreter in a process started with
TRITON_INTERPRET=1 (`scripts/test.sh` runs that selection second). In a plain CPU process they could only skip,
so they are not collected there; the tests of this folder that need neither (inductor contract, mutation memo)
are."""

import torch

from pq_ao.kernels.triton._common import interpreting

collect_ignore_glob = [] if interpreting() or torch.cuda.is_available() else ["test_triton_*.py"]
