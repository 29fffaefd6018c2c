"""Triton activation quantizers == the plain-torch references, bit for bit (fresh random inputs, ties included)."""

from __future__ import annotations

import pytest
import torch
from pq_triton_testutil import cases, poison

from pq_ao.kernels import reference
from pq_ao.kernels import triton as tk

CPU_SHAPES = [(1, 2), (3, 70), (2, 5, 130), (17, 1030)]
GPU_SHAPES = [(1, 4096), (7, 4096), (16, 14336), (333, 1030), (2048, 4096), (8192, 4096), (4096, 14336), (2, 3, 576)]


def _input(shape, dtype, device, scale, gen):
    """Gaussian activations with a few outliers, plus exact ties (k + 1/2) * scale and values past the clamp."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * 3.0 * scale
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=gen)[: max(1, n // 8)]
    k = torch.randint(-10, 10, (idx.numel(),), generator=gen).float()
    flat[idx] = (k + 0.5) * scale
    flat[torch.randperm(n, generator=gen)[: max(1, n // 50)]] *= 40.0
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device,shape", cases(CPU_SHAPES, GPU_SHAPES))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_static_matches_reference(device, shape, bits, dtype):
    gen = torch.Generator().manual_seed(1000 + bits + shape[-1])
    for shape in [shape]:
        scale = torch.rand(1, generator=gen) * 0.2 + 0.01  # a power of 2 would make ties exact in bf16 too
        scale = torch.tensor([0.125], dtype=torch.float32) if shape[-1] == 70 else scale
        x = _input(shape, dtype, device, float(scale), gen)
        scale = scale.to(device)
        want = reference.quantize_static(x, scale, bits)
        poison(device, want.numel())
        got = tk.quantize_static(x, scale, bits)
        assert got.dtype == want.dtype and got.shape == want.shape, (shape, got.shape, want.shape)
        assert torch.equal(got, want), f"{shape} {dtype}: {int((got != want).sum())} of {got.numel()} differ"


@pytest.mark.parametrize("device,shape", cases(CPU_SHAPES, GPU_SHAPES))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_dynamic_matches_reference(device, shape, bits, dtype):
    gen = torch.Generator().manual_seed(2000 + bits + shape[-1])
    for shape in [shape]:
        x = _input(shape, dtype, device, 0.05, gen)
        x.view(-1, shape[-1])[0].zero_()  # an all-zero row: the absmax floor, q == 0
        # the oracle runs on the CPU: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal
        # (PyTorch's scalar-divisor fast path), so the CUDA reference's scale 2*absmax/(2**b-1) can be 1 ulp off
        # the contract's single division; the kernel divides (div_rn) like the CPU reference
        clip = None if shape[0] % 2 == 0 else torch.tensor([0.8125], dtype=torch.float32)  # a searched clip factor
        q_want, s_want = (t.to(device) for t in reference.quantize_dynamic(x.cpu(), bits, clip))
        poison(device, q_want.numel())
        q, s = tk.quantize_dynamic(x, bits, None if clip is None else clip.to(device))
        assert s.shape == s_want.shape and s.dtype == torch.float32
        assert torch.equal(s, s_want), f"{shape}: scales differ"
        assert torch.equal(q, q_want), f"{shape} {dtype}: {int((q != q_want).sum())} of {q.numel()} differ"


def test_scale_must_not_be_0d():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="0-d"):
        tk.quantize_static(x, torch.tensor(0.1), 8)
