"""Triton for sm_90 on a machine without a GPU (tests and benchmarks): Triton's front end (TTIR), torch's mutation
analysis of user kernels and AOTAutograd over fake CUDA tensors need only a target, which a stand-in driver
reports. Nothing is compiled to a binary or launched."""

from __future__ import annotations

import contextlib

import torch
import triton
from triton.backends.compiler import GPUTarget

SM90 = GPUTarget("cuda", 90, 32)


class Sm90Driver:
    """The part of Triton's active driver that TTIR generation asks for."""

    def get_current_target(self) -> GPUTarget:
        return SM90

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda")


@contextlib.contextmanager
def sm90_driver():
    """Make `Sm90Driver` Triton's active driver for the block; the previous one (maybe none yet) comes back."""
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)
    config._active = Sm90Driver()
    try:
        yield
    finally:
        config._active = previous
