"""Helpers for the Triton kernel tests: which device runs them, poisoned outputs, tolerance checks."""

from __future__ import annotations

import pytest
import torch

from pq_ao.kernels.triton._common import interpreting

# "cpu": the kernels under Triton's CPU interpreter (set up by conftest.py when there is no GPU).
# "cuda": the compiled kernels. Each test is parametrized over both; the one that cannot run is skipped.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="kernels are compiled for CUDA here")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="no GPU")],
    ),
]


def cases(cpu_cases, gpu_cases):
    """(device, case) parameters: each case its own test, so pytest-xdist can spread the GPU ones."""
    cpu_mark = pytest.mark.skipif(not interpreting(), reason="kernels are compiled for CUDA here")
    gpu_marks = [pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="no GPU")]
    return ([pytest.param("cpu", c, marks=cpu_mark, id=f"cpu-{c}") for c in cpu_cases]
            + [pytest.param("cuda", c, marks=gpu_marks, id=f"cuda-{c}") for c in gpu_cases])


def poison(device: str, nbytes: int) -> None:
    """Fill a just-freed block of `nbytes` with 0xFF (NaN for bf16/fp32, -1 for ints), so the caching allocator
    hands poisoned memory to the next allocation of that size: unwritten outputs then show up."""
    if device == "cuda":
        t = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        t.fill_(0xFF)
        del t


def assert_one_rounding(y: torch.Tensor, ref32: torch.Tensor, what: str = "", terms: torch.Tensor | None = None):
    """y (any float dtype) equals the fp32 value ref32 rounded once to y.dtype, up to one ulp of y.dtype, plus a
    few fp32 roundings of `terms` (|acc * scales| + |bias|): the GPU may fuse the epilogue's multiply-add, which
    differs from the reference's two roundings by fp32 eps of the terms, visible where the bias cancels them."""
    assert not torch.isnan(y).any(), f"{what}: NaN in output (unwritten elements?)"
    eps = torch.finfo(y.dtype).eps
    tiny = torch.finfo(y.dtype).tiny
    err = (y.float() - ref32).abs()
    bound = eps * ref32.abs() + tiny
    if terms is not None:
        bound = bound + 4 * torch.finfo(torch.float32).eps * terms
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {y.numel()} elements off by more than one {y.dtype} rounding; "
        f"worst {float((err / bound).max()):.3g}x the bound"
    )


def assert_boundary_flips_only(q: torch.Tensor, q_ref: torch.Tensor, v: torch.Tensor, what: str = "",
                               tol: float = 2e-4, max_rate: float = 5e-3) -> None:
    """Integer grids q and q_ref (unpacked) may differ only by 1, only where the exact pre-rounding value v (fp64,
    in units of the scale) lies within `tol * max|v|` of a rounding boundary (the transform's error is relative to
    the row, not to the element), and only rarely."""
    diff = (q.long() - q_ref.long()).abs()
    assert int(diff.max()) <= 1, f"{what}: integer results differ by {int(diff.max())}"
    off = diff > 0
    if off.any():
        frac = (v[off] - torch.floor(v[off])).sub(0.5).abs()
        near = frac <= tol * float(v.abs().max().clamp_min(1.0))
        assert near.all(), f"{what}: {int((~near).sum())} mismatches away from a rounding boundary"
        assert off.float().mean() <= max_rate, f"{what}: {int(off.sum())} boundary flips of {q.numel()}"


def through_aoti(fn, args: tuple, path, dynamic_shapes=None):
    """`fn(*args)` exported, AOT-compiled into the `.pt2` at `path` and loaded back in this process: the loaded
    program, which takes the same positional tensors as `fn`."""
    from pq_ao.runtime import preload_libstdcxx

    preload_libstdcxx()  # AOTI's wrapper .so needs it on the GPU box (see pq_ao/runtime.py)

    class Call(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    ep = torch.export.export(Call(), args, dynamic_shapes=dynamic_shapes, strict=False)
    pt2 = torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return torch._inductor.aoti_load_package(pt2)
