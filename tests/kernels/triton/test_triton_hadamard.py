"""Triton online Hadamard (alone and fused with static quantization) against the references.

The transform sums in a different order than the reference (tensor-core dots over bf16 hi/lo splits), so it
matches to about fp32 precision, not bit for bit; the fused quantizer may therefore flip a value by one step where
the exact transform lies on a rounding boundary, and nowhere else."""

from __future__ import annotations

import math

import pytest
import torch
from pq_triton_testutil import assert_boundary_flips_only, cases, poison

from pq_ao import hadamard, quant_math
from pq_ao.kernels import reference
from pq_ao.kernels import triton as tk

# (rows, n): powers of 2 (R3 head dims, hidden sizes), K * 2^m with Paley/Williamson K, a K with no +-1 matrix
# (orthogonal fallback factor, 7), and sizes the kernel hands to plain torch (2^m part < 16)
CPU_CASES = [(5, 64), (40, 128), (3, 256), (2, 4096), (3, 576), (3, 1536), (2, 14336), (3, 7 * 32), (2, 28 * 8)]
GPU_CASES = [(4096, 64), (8192, 128), (333, 256), (2048, 4096), (1000, 576), (1000, 1536), (2048, 14336),
             (64, 7 * 32), (9, 28 * 8), (1, 14336), (3, 4096)]


def _exact(x, had_k):
    """fp64 transform on the CPU."""
    return hadamard.hadamard_transform(x.double().cpu(), had_k.double())


@pytest.mark.parametrize("device,case", cases(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hadamard_transform(device, case, dtype):
    gen = torch.Generator().manual_seed(5 + case[1])
    for rows, n in [case]:
        _, had_k = hadamard.hadamard_factor(n)
        x = (torch.randn(rows, n, generator=gen) * 2).to(dtype).to(device)
        hk = had_k.float().to(device)
        poison(device, x.numel() * x.element_size())
        y = tk.hadamard_transform(x, hk)
        assert y.dtype == dtype and y.shape == x.shape
        exact = _exact(x, had_k)
        if dtype == torch.float32:
            err = ((y.double().cpu() - exact).norm() / exact.norm()).item()
            assert err < 2e-5, (n, err)
        else:
            # within one rounding of the exact value, up to fp32-level absolute error (sums of n terms: values near
            # zero carry the cancellation error of their row)
            ulp = torch.finfo(dtype).eps
            bad = (y.double().cpu() - exact).abs() > ulp * exact.abs() + 1e-5 * exact.abs().max()
            assert not bad.any(), (n, int(bad.sum()))
            ref = reference.hadamard_transform(x, hk)
            # the kernel is accurate to about 2**-17 relative (bf16 hi/lo splits): a few one-ulp differences from
            # the fp32 reference in bf16, more in fp16 (ulp 2**-11)
            assert (y != ref).float().mean() < (0.01 if dtype == torch.bfloat16 else 0.05), n


@pytest.mark.parametrize("device,case", cases(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hadamard_quantize_static(device, case, bits, dtype):
    gen = torch.Generator().manual_seed(6 + bits + case[1])
    qmax = quant_math.qrange(bits)[1]
    for rows, n in [case]:
        _, had_k = hadamard.hadamard_factor(n)
        x = (torch.randn(rows, n, generator=gen) * 2).to(dtype).to(device)
        hk = had_k.float().to(device)
        exact = _exact(x, had_k)
        scale = torch.tensor([float(exact.abs().max()) * 0.8 / (qmax + 0.5)], dtype=torch.float32, device=device)
        want = reference.hadamard_quantize_static(x, hk, scale, bits)
        poison(device, want.numel())
        got = tk.hadamard_quantize_static(x, hk, scale, bits)
        assert got.dtype == want.dtype and got.shape == want.shape
        unpack = quant_math.unpack_int4 if bits == 4 else (lambda t: t)
        assert_boundary_flips_only(unpack(got).cpu(), unpack(want).cpu(), exact / float(scale), f"n={n} {dtype}")


def _kernel_device():
    from pq_ao.kernels.triton._common import interpreting

    return "cpu" if interpreting() else ("cuda" if torch.cuda.is_available() else None)


@pytest.mark.skipif(_kernel_device() is None, reason="needs CUDA or TRITON_INTERPRET=1")
def test_hadamard_sylvester_order_and_scale():
    """H_n x for a one-hot x is column j of H_n / sqrt(n): checks the Sylvester ordering and the had_k side."""
    device = _kernel_device()
    n = 12 * 128
    _, had_k = hadamard.hadamard_factor(n)
    h = torch.kron(had_k, hadamard.sylvester(n // 12)) / math.sqrt(n)
    eye = torch.eye(n, dtype=torch.float32)[[0, 1, 200, n - 1]]
    y = tk.hadamard_transform(eye.to(device), had_k.float().to(device)).double().cpu()
    assert torch.allclose(y, h[:, [0, 1, 200, n - 1]].T, atol=1e-6)


# gated (a gated MLP's down_proj input): the A = 1 path, the A > 1 path (K x 2^m), the plain-torch hand-over
GATED_CPU = [(5, 64), (3, 1536), (2, 14336), (3, 28 * 8)]
GATED_GPU = [(4096, 128), (1000, 1536), (2048, 14336), (1, 14336), (9, 28 * 8)]


@pytest.mark.parametrize("device,case", cases(GATED_CPU, GATED_GPU))
@pytest.mark.parametrize("form", ["int4", "int8", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_hadamard_quantize_static(device, case, form, dtype):
    """`gated=True` reads joined [gate | up] rows and quantizes the transform of `silu(gate) * up`: the codes of the
    plain quantizer on `reference.swiglu`'s product, up to boundary flips (the kernel's exp may differ from torch's in
    the last bit, and the transform sums in its own order)."""
    rows, n = case
    gen = torch.Generator().manual_seed(n + rows)
    _, had_k = hadamard.hadamard_factor(n)
    gate_up = (torch.randn(rows, 2 * n, generator=gen) * 2).to(dtype)
    x = reference.swiglu(gate_up)
    exact = _exact(x, had_k)
    bits = 8 if form == "int8" else 4
    qmax = quant_math.qrange(bits)[1]
    scale = torch.tensor([float(exact.abs().max()) * 0.8 / (qmax + 0.5)], dtype=torch.float32)
    want = quant_math.unpack_int4(reference.hadamard_quantize_static(x, had_k.float(), scale, bits)) if bits == 4 \
        else reference.hadamard_quantize_static(x, had_k.float(), scale, bits)
    dev = lambda t: t.to(device)  # noqa: E731
    poison(device, rows * n * 2)
    if form == "e4m3":
        got = tk.hadamard_quantize_static_e4m3(dev(gate_up), dev(had_k.float()), dev(scale), gated=True)
        assert got.dtype == torch.float8_e4m3fn and got.shape == (rows, n)
        got = got.float().to(torch.int8)
    else:
        got = tk.hadamard_quantize_static(dev(gate_up), dev(had_k.float()), dev(scale), bits, gated=True)
        got = quant_math.unpack_int4(got) if bits == 4 else got
    assert_boundary_flips_only(got.cpu(), want, exact / float(scale), f"gated n={n} {dtype} {form}")


def test_gated_input_must_join_two_halves():
    with pytest.raises(ValueError, match="even last dim"):
        tk.hadamard_quantize_static(torch.randn(2, 129), None, torch.tensor([0.1]), 4, gated=True)


@pytest.mark.parametrize("device,case", cases([(7, 14336), (9, 4096)], [(1000, 14336), (333, 4096)]))
@pytest.mark.parametrize("block_c", [16, 32, 64, 128])
def test_row_loop_grid_and_chunks(monkeypatch, device, case, block_c):
    """The row loop (rows of more than 128 elements): every grid size and every split of a row into blocks of M_A's
    rows writes the same bytes (a row's sums do not depend on which program runs it), and each column-chunk width
    gives the reference's codes up to boundary flips. Few programs here walk many units each, with the next step's
    loads issued a step ahead across unit ends; programs past the last unit (the grid of a symbolic M) write
    nothing."""
    from pq_ao.kernels.triton import hadamard as tk_hadamard

    rows, n = case
    gen = torch.Generator().manual_seed(n + block_c)
    _, had_k = hadamard.hadamard_factor(n)
    gate_up = (torch.randn(rows, 2 * n, generator=gen) * 2).to(torch.bfloat16)
    exact = _exact(reference.swiglu(gate_up), had_k)
    scale = torch.tensor([float(exact.abs().max()) * 0.8 / 7.5], dtype=torch.float32)
    args = (gate_up.to(device), had_k.float().to(device), scale.to(device))
    got = {}
    monkeypatch.setitem(tk_hadamard.ROW_LOOP, "block_c", block_c)
    # a-blocks: one (M_A whole), two, and M_A's 16-row blocks (A_PAD / 16: 8 at 14336, 2 at 4096); programs: 1 and 3
    # per a-block, one unit each, more than units (a symbolic M)
    settings = [(na, k) for na in sorted({1, 2, tk_hadamard.next_pow2(n // 128) // 16 or 1})
                for k in (1, 3, rows, rows + 5)]
    for na, k in settings:
        monkeypatch.setattr(tk_hadamard, "_a_blocks", lambda m, a_pad, na=na: na)
        monkeypatch.setattr(tk_hadamard, "_row_loop_programs", lambda m, na, k=k: k * na)
        poison(device, rows * n)
        got[na, k] = tk_hadamard.hadamard_quantize_static_e4m3(*args, gated=True)
        if device == "cuda":
            torch.cuda.synchronize()  # a fault surfaces here, at its (a-blocks, programs)
        got[na, k] = got[na, k].cpu()
    for key in settings[1:]:
        assert torch.equal(got[1, 1].view(torch.uint8), got[key].view(torch.uint8)), key
    assert_boundary_flips_only(got[1, 1].float().to(torch.int8), quant_math.unpack_int4(
        reference.hadamard_quantize_static(reference.swiglu(gate_up), had_k.float(), scale, 4)),
        exact / float(scale), f"n={n} block_c={block_c}")


def test_a_blocks_fill_the_multiprocessors_for_few_rows():
    """Decode rows split into 16-row blocks of M_A (at most A_PAD / 16), prefill rows stay whole, and the grid
    holds a whole number of a-blocks."""
    from pq_ao.kernels.triton import hadamard as tk_hadamard

    assert tk_hadamard._a_blocks(1, 128) == 8
    assert tk_hadamard._a_blocks(1, 32) == 2
    assert tk_hadamard._a_blocks(16, 128) == 8
    assert tk_hadamard._a_blocks(64, 128) == 2
    assert tk_hadamard._a_blocks(2048, 128) == 1
    symbolic = object()  # not an int: an exported prefill's M
    assert tk_hadamard._a_blocks(symbolic, 128) == 1
    for m, na in ((1, 8), (5, 8), (100, 1), (10**6, 2), (symbolic, 8)):
        programs = tk_hadamard._row_loop_programs(m, na)
        assert programs % na == 0 and 0 < programs
        assert m is symbolic or programs <= m * na
