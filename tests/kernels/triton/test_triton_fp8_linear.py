"""The fp8 tensor-core path of the static W4A4 linear (`fp8_linear`, picked by `linear.static_linear`): e4m3 codes
and widened weights hold exactly the reference's integers, the fp8 GEMM sums them exactly, and the linear is
within one output rounding of the reference. On the CPU: Triton's interpreter and torch's CPU `_scaled_mm`."""

from __future__ import annotations

import pytest
import torch
from pq_triton_testutil import DEVICES, assert_one_rounding, cases, poison

from pq_ao import quant_math
from pq_ao.hadamard import hadamard_factor
from pq_ao.kernels import reference
from pq_ao.kernels.triton import fp8_linear, hadamard, linear, quant


@pytest.mark.parametrize("device,shape", cases([(3, 64), (5, 38)], [(1, 64), (4096, 4096), (1024, 14336), (7, 1030)]))
def test_widen_int4_e4m3_is_exact(device, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    poison(device, n * k)
    w8 = fp8_linear.widen_int4_e4m3(wq.to(device))
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (n, k)
    assert torch.equal(w8.float().cpu(), quant_math.unpack_int4(wq).float())


@pytest.mark.parametrize("device,shape", cases([(5, 96)], [(3, 4096), (2048, 14336), (33, 576)]))
@pytest.mark.parametrize("had", [False, True])
def test_e4m3_codes_are_the_static_quantizers(device, shape, had):
    """quantize_static_e4m3 / hadamard_quantize_static_e4m3 hold the values of the packed kernels (same kernels,
    another store)."""
    m, k = shape
    gen = torch.Generator().manual_seed(m * k + had)
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16().to(device)
    s = torch.tensor([0.21], device=device)
    if had:
        hk = hadamard_factor(k)[1].float().to(device)
        codes, packed = hadamard.hadamard_quantize_static_e4m3(x, hk, s), hadamard.hadamard_quantize_static(x, hk, s, 4)
    else:
        codes, packed = quant.quantize_static_e4m3(x, s), quant.quantize_static(x, s, 4)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (m, k)
    assert torch.equal(codes.float().cpu(), quant_math.unpack_int4(packed.cpu()).float())


@pytest.mark.parametrize("device,k", cases([64, 160], [4096, 14336]))
def test_fp8_gemm_of_codes_is_exact(device, k):
    """The premise: e4m3 codes x widened weights through `_scaled_mm` (unit scales, fp32 out) give the reference
    integers, for random operands and for the largest sums (all -8: K * 64)."""
    gen = torch.Generator().manual_seed(k)
    one = torch.ones((), device=device)
    for q, wq in [(torch.randint(-8, 8, (32, k), dtype=torch.int8, generator=gen),
                   torch.randint(0, 256, (48, k // 2), dtype=torch.uint8, generator=gen)),
                  (torch.full((16, k), -8, dtype=torch.int8), torch.full((16, k // 2), 0x88, dtype=torch.uint8))]:
        got = torch._scaled_mm(q.float().to(torch.float8_e4m3fn).to(device), fp8_linear.widen_int4_e4m3(wq.to(device)).t(),
                               scale_a=one, scale_b=one, out_dtype=torch.float32)
        want = reference.int_linear(q, torch.ones(1), wq, torch.ones(wq.shape[0]), None, 8, 4, torch.float32)
        assert torch.equal(got.cpu(), want)


CPU_OP = [(9, 48, 64, False), (6, 64, 96, True)]
GPU_OP = [(512, 576, 576, False), (700, 1536, 576, False), (513, 576, 1536, True), (1000, 4096, 14336, True),
          (2048, 1024, 4096, False), (777, 4096, 4096, True), (4096, 14336, 4096, False)]


@pytest.mark.parametrize("device,shape", cases(CPU_OP, GPU_OP))
def test_static_linear_fp8_path_is_one_rounding_from_the_reference(device, shape, monkeypatch):
    m, n, k, had = shape
    monkeypatch.setattr(fp8_linear, "FP8_MIN_M", 1)
    taken = []
    real = fp8_linear.e4m3_int4_linear
    monkeypatch.setattr(fp8_linear, "e4m3_int4_linear", lambda *a: taken.append(1) or real(*a))
    gen = torch.Generator().manual_seed(m + n + k)
    x = (torch.randn(m, k, generator=gen) * 2).bfloat16()
    hk = hadamard_factor(k)[1].float() if had else None
    s = torch.tensor([float(x.float().abs().max()) / 7.5 * 0.6])
    wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    ws = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen).bfloat16()
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    # the codes of the int4 path on this device (the Triton Hadamard may flip a code at a rounding boundary against
    # the fp32 reference transform: test_triton_hadamard bounds that); the GEMM must reproduce its integers
    xq = (hadamard.hadamard_quantize_static(dev(x), dev(hk), dev(s), 4).cpu() if had
          else reference.quantize_static(x, s, 4))
    ref32 = reference.int_linear(xq, s, wq, ws, bias, 4, 4, torch.float32)
    terms = reference.int_linear(xq, s, wq, ws, None, 4, 4, torch.float32).abs() + bias.float().abs()
    poison(device, m * n * 2)
    y = linear.static_linear(dev(x), dev(s), dev(hk), dev(wq), dev(ws), dev(bias), 4, 4, torch.bfloat16)
    assert taken and y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_one_rounding(y.cpu(), ref32, f"fp8 static_linear {m}x{n}x{k}", terms)


@pytest.mark.parametrize("device", DEVICES)
def test_static_linear_picks_its_path(device, monkeypatch):
    """fp8 from FP8_MIN_M rows on (W4A4, bf16 out); the int4 Triton path below it, and for an fp32 output, W4A8,
    or a K that is not a multiple of 16."""
    taken = []
    real = fp8_linear.e4m3_int4_linear
    monkeypatch.setattr(fp8_linear, "e4m3_int4_linear", lambda *a: taken.append(1) or real(*a))
    monkeypatch.setattr(fp8_linear, "FP8_MIN_M", 8)

    def run(m, k, a_bits, out_dtype):
        taken.clear()
        x = torch.randn(m, k, dtype=out_dtype, device=device)
        wq = torch.randint(0, 256, (32, k // 2), dtype=torch.uint8, device=device)
        linear.static_linear(x, torch.tensor([0.1], device=device), None, wq, torch.ones(32, device=device), None,
                             a_bits, 4, out_dtype)
        return bool(taken)

    assert run(8, 64, 4, torch.bfloat16)
    assert not run(7, 64, 4, torch.bfloat16)
    assert not run(8, 64, 4, torch.float32)
    assert not run(8, 64, 8, torch.bfloat16)
    assert not run(8, 72, 4, torch.bfloat16)


GATED_CPU_OP = [(6, 64, 96, True), (5, 48, 64, False)]
GATED_GPU_OP = [(2048, 4096, 14336, True), (1, 4096, 14336, True), (300, 576, 1536, True), (700, 576, 1536, False)]


@pytest.mark.parametrize("device,shape", cases(GATED_CPU_OP, GATED_GPU_OP))
@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_static_linear_is_static_linear_of_the_gated_product(device, shape, fp8, monkeypatch):
    """A gated MLP's down_proj from the joined gate/up: `static_linear(silu(gate) * up)`, on the fp8 path and on
    the int4 path (GEMV at one row), with or without R4. Codes may flip at rounding boundaries (the kernel's SiLU and
    transform round in their own order), which moves the output by far less than a wrong gating would."""
    m, n, k, had = shape
    monkeypatch.setattr(fp8_linear, "FP8_MIN_M", 1 if fp8 else 1 << 30)
    gen = torch.Generator().manual_seed(m + n + k)
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 2).bfloat16()
    x = reference.swiglu(gate_up)
    hk = hadamard_factor(k)[1].float() if had else None
    s = torch.tensor([float(x.float().abs().max()) / 7.5 * 0.3])
    wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    ws = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen).bfloat16()
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    want = linear.static_linear(dev(x), dev(s), dev(hk), dev(wq), dev(ws), dev(bias), 4, 4, torch.bfloat16).float()
    got = linear.swiglu_static_linear(dev(gate_up), dev(s), dev(hk), dev(wq), dev(ws), dev(bias), 4, 4,
                                      torch.bfloat16).float()  # fmt: skip
    assert got.shape == (m, n)
    assert ((got - want).norm() / want.norm()) < 5e-3
