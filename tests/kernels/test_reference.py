"""The plain-torch references: Hadamard vs dense matrices, quantizers vs the grid, int_linear vs int64 matmuls."""

from __future__ import annotations

import math

import pytest
import torch

from pq_ao import hadamard, quant_math
from pq_ao.kernels import reference as ref

# n = K * 2**m with K from Sylvester (1), Paley I (12, 20), Paley II (36), Williamson (156), the QR fallback (97)
HAD_SIZES = [2, 64, 128, 12 * 4, 20 * 8, 36 * 2, 156 * 2, 97 * 2, 12 * 128]


def _dense(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, had_k = hadamard.hadamard_factor(n)
    return had_k, torch.kron(had_k, hadamard.sylvester(n // k))


@pytest.mark.parametrize("n", HAD_SIZES)
def test_hadamard_transform_is_the_dense_orthonormal_matrix(n):
    had_k, h = _dense(n)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(5, 3, n, generator=gen)
    y = ref.hadamard_transform(x, had_k.float())
    assert y.dtype == torch.float32 and y.shape == x.shape
    want = x.double() @ h.T / math.sqrt(n)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())
    q = ref.hadamard_transform(torch.eye(n), had_k.float())  # rows: the orthonormal matrix's transpose
    torch.testing.assert_close(q @ q.T, torch.eye(n), rtol=0, atol=1e-5)
    back = ref.hadamard_transform(y, had_k.T.float().contiguous())
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)


def test_hadamard_transform_dtypes_and_errors():
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    had_k = hadamard.hadamard_factor(48)[1].float()
    y = ref.hadamard_transform(x, had_k)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref.hadamard_transform(x.float(), had_k).bfloat16())  # fp32 inside, one rounding
    with pytest.raises(ValueError, match="K \\* 2\\*\\*m"):
        ref.hadamard_transform(torch.randn(2, 40), had_k)
    with pytest.raises(ValueError, match="square"):
        ref.hadamard_transform(x, torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        ref.hadamard_transform(x.to(torch.int32), had_k)


def _scale(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 2), (3, 70), (2, 5, 130), (17, 1030)])
def test_quantize_static(bits, shape):
    gen = torch.Generator().manual_seed(bits + shape[-1])
    x = torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 2
    s = _scale(0.37)
    q = ref.quantize_static(x, s, bits)
    k = shape[-1]
    assert q.shape == (*shape[:-1], k // 2 if bits == 4 else k)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    got = quant_math.unpack_int4(q) if bits == 4 else q
    lo, hi = quant_math.qrange(bits)
    want = torch.round(x.double() / 0.37).clamp(lo, hi)  # x / s in fp64: the same except at (absent) near-ties
    assert torch.equal(got.double(), want)


def test_quantize_static_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="0-d"):
        ref.quantize_static(x, torch.tensor(0.1), 8)
    with pytest.raises(ValueError, match="shape \\[1\\]"):
        ref.quantize_static(x, torch.ones(3, 1), 8)
    with pytest.raises(TypeError, match="float32"):
        ref.quantize_static(x, _scale(0.1).double(), 8)
    with pytest.raises(ValueError, match="even"):
        ref.quantize_static(torch.randn(3, 7), _scale(0.1), 4)
    with pytest.raises(ValueError, match="bits"):
        ref.quantize_static(x, _scale(0.1), 16)
    with pytest.raises(TypeError, match="floating"):
        ref.quantize_static(x.to(torch.int8), _scale(0.1), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_quantize_static_keeps_fp32_transform(dtype):
    n = 12 * 16
    had_k = hadamard.hadamard_factor(n)[1].float()
    x = torch.randn(33, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    s = _scale(0.05)
    got = ref.hadamard_quantize_static(x, had_k, s, 4)
    assert torch.equal(got, ref.quantize_static(ref.hadamard_transform(x.float(), had_k), s, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_dynamic(bits):
    x = torch.randn(2, 7, 66, generator=torch.Generator().manual_seed(bits)) * torch.rand(2, 7, 1) * 5
    x[0, 0] = 0.0  # an all-zero token: a tiny positive scale, q == 0
    q, s = ref.quantize_dynamic(x, bits)
    assert s.shape == (2, 7, 1) and s.dtype == torch.float32
    assert s[0, 0].item() > 0
    lo, hi = quant_math.qrange(bits)
    want_s = (x.abs().amax(-1, keepdim=True).clamp_min(quant_math.ABSMAX_EPS) * 2 / (2**bits - 1)).float()
    assert torch.equal(s, want_s)
    got = quant_math.unpack_int4(q) if bits == 4 else q
    assert torch.equal(got, quant_math.quantize(x, s, bits))
    assert (got[0, 0] == 0).all()
    extreme = (got.amax(-1) == hi) | (got.amin(-1) <= lo + 1)  # each token's absmax hits an end of the grid
    assert extreme.view(-1)[1:].all()


# ---------------------------------------------------------------------------------------------------------------
# int_linear


def _rand_q(shape, bits, gen):
    lo, hi = quant_math.qrange(bits)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


def _store(q, bits):
    return quant_math.pack_int4(q) if bits == 4 else q


def _expected(xq, xs, wq, ws, bias, out_dtype):
    acc = xq.long() @ wq.long().T  # independent: int64, exact
    y = acc.float() * xs.reshape(-1, 1) * ws
    return (y if bias is None else y + bias.float()).to(out_dtype)


SHAPES = [(1, 2, 1), (7, 34, 5), (33, 130, 17), (5, 1030, 3), (3, 2050, 9), (64, 576, 40)]


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (4, 8), (8, 4), (8, 8)])
@pytest.mark.parametrize("per_token", [False, True])
def test_int_linear_exact(a_bits, w_bits, per_token):
    gen = torch.Generator().manual_seed(a_bits * 10 + w_bits + per_token)
    for m, k, n in SHAPES:
        xq, wq = _rand_q((m, k), a_bits, gen), _rand_q((n, k), w_bits, gen)
        xs = torch.rand(m, 1, generator=gen) if per_token else torch.rand(1, generator=gen)
        ws = torch.rand(n, generator=gen) * 0.01
        bias = torch.randn(n, generator=gen).bfloat16()
        for out_dtype, b in [(torch.float32, None), (torch.bfloat16, bias)]:
            y = ref.int_linear(_store(xq, a_bits), xs, _store(wq, w_bits), ws, b, a_bits, w_bits, out_dtype)
            assert y.dtype == out_dtype and y.shape == (m, n)
            assert torch.equal(y, _expected(xq, xs, wq, ws, b, out_dtype)), (m, k, n, out_dtype)


@pytest.mark.parametrize("a_bits,w_bits,k", [(8, 8, 1500), (8, 8, 3000), (4, 8, 24000), (8, 4, 24000)])
def test_int_linear_past_fp32_integers(a_bits, w_bits, k):
    """Operands near qmin (products near the bound, all positive): |acc| > 2**24, where one fp32 GEMM rounds."""
    gen = torch.Generator().manual_seed(k + a_bits)

    def near_qmin(shape, bits):
        lo = quant_math.qrange(bits)[0]
        return torch.randint(lo, lo // 2 if bits == 4 else lo + 28, shape, generator=gen, dtype=torch.int8)

    xq, wq = near_qmin((16, k), a_bits), near_qmin((16, k), w_bits)
    one, ws = torch.ones(1), torch.ones(16)
    want = _expected(xq, one, wq, ws, None, torch.float32)
    # The regime, on any machine: exact sums past 2**24, many of them not fp32 numbers, so a GEMM that accumulates
    # in fp32 must round somewhere. (Whether this CPU's BLAS does is its own business: some accumulate wider.)
    exact = xq.long() @ wq.long().T
    assert exact.min() > 2**24
    assert (exact.float().long() != exact).float().mean() > 0.3
    y = ref.int_linear(_store(xq, a_bits), one, _store(wq, w_bits), ws, None, a_bits, w_bits, torch.float32)
    assert torch.equal(y, want)


def test_int_linear_exact_without_ieee_fp32_matmul():
    """Reduced-precision fp32 matmul settings switch the reference to fp64 GEMMs, still exact."""
    gen = torch.Generator().manual_seed(11)
    xq, wq = _rand_q((9, 1030), 8, gen), _rand_q((4, 1030), 8, gen)
    xs, ws = torch.rand(1, generator=gen), torch.rand(4, generator=gen)
    old = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert not ref._cpu_fp32_matmul_is_ieee()
        y = ref.int_linear(xq, xs, wq, ws, None, 8, 8, torch.float32)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
    assert ref._cpu_fp32_matmul_is_ieee()
    assert torch.equal(y, _expected(xq, xs, wq, ws, None, torch.float32))


def test_int_linear_leading_dims():
    gen = torch.Generator().manual_seed(2)
    xq, wq = _rand_q((2, 3, 20), 4, gen), _rand_q((6, 20), 4, gen)
    xs, ws = torch.rand(2, 3, 1, generator=gen), torch.rand(6, generator=gen)
    y = ref.int_linear(_store(xq, 4), xs, _store(wq, 4), ws, None, 4, 4, torch.float32)
    assert y.shape == (2, 3, 6)
    assert torch.equal(y.reshape(6, 6), _expected(xq.reshape(6, 20), xs, wq, ws, None, torch.float32))


def test_int_linear_errors():
    x8, w8 = torch.zeros(4, 16, dtype=torch.int8), torch.zeros(3, 16, dtype=torch.int8)
    x4, w4 = torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8)
    one, ws = torch.ones(1), torch.ones(3)
    f32 = torch.float32
    with pytest.raises(TypeError, match="packed int4"):
        ref.int_linear(x8, one, w4, ws, None, 4, 4, f32)
    with pytest.raises(ValueError, match="reduction sizes differ"):
        ref.int_linear(x4, one, w8[:, :10], ws, None, 4, 8, f32)
    with pytest.raises(ValueError, match="0-d"):
        ref.int_linear(x8, torch.tensor(1.0), w8, ws, None, 8, 8, f32)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        ref.int_linear(x8, torch.ones(3, 1), w8, ws, None, 8, 8, f32)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ref.int_linear(x8, one, w8, torch.ones(3, 1), None, 8, 8, f32)
    with pytest.raises(ValueError, match="bias must have shape"):
        ref.int_linear(x8, one, w8, ws, torch.ones(4), 8, 8, f32)
    with pytest.raises(TypeError, match="out_dtype"):
        ref.int_linear(x8, one, w8, ws, None, 8, 8, torch.int32)
    with pytest.raises(ValueError, match="bits"):
        ref.int_linear(x8, one, w8, ws, None, 16, 8, f32)
    with pytest.raises(ValueError, match="overflow"):
        big = torch.zeros(1, 2**17, dtype=torch.int8)
        ref.int_linear(big, one, big, torch.ones(1), None, 8, 8, f32)
