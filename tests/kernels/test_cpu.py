"""The oneDNN CPU kernel of int_linear: identical to the reference wherever it is used, and used where it should be."""

from __future__ import annotations

import pytest
import torch

import pq_ao.kernels  # noqa: F401  (registers torch.ops.pq_ao.*)
from pq_ao import quant_math
from pq_ao.kernels import cpu
from pq_ao.kernels import reference as ref

PAIRS = [(4, 4), (4, 8), (8, 4), (8, 8)]
SHAPES = [(1, 2, 1), (7, 34, 5), (33, 130, 17), (5, 1024, 3), (64, 576, 40), (300, 96, 70)]

needs_onednn = pytest.mark.skipif(not cpu._exact_here(4, 4), reason="this CPU's oneDNN int8 GEMM is not exact")


def _operands(m, k, n, a_bits, w_bits, gen, per_token=False):
    def rand_q(shape, bits):
        lo, hi = quant_math.qrange(bits)
        q = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)
        return quant_math.pack_int4(q) if bits == 4 else q

    xs = torch.rand(m, 1, generator=gen) if per_token else torch.rand(1, generator=gen)
    return rand_q((m, k), a_bits), xs, rand_q((n, k), w_bits), torch.rand(n, generator=gen) * 0.01


@needs_onednn
@pytest.mark.parametrize("a_bits,w_bits", PAIRS)
@pytest.mark.parametrize("per_token", [False, True])
def test_identical_to_the_reference(a_bits, w_bits, per_token):
    gen = torch.Generator().manual_seed(a_bits * 10 + w_bits + per_token)
    for m, k, n in SHAPES:
        xq, xs, wq, ws = _operands(m, k, n, a_bits, w_bits, gen, per_token)
        assert cpu.usable(xq, wq, a_bits, w_bits)
        bias = torch.randn(n, generator=gen).bfloat16()
        for out_dtype, b in [(torch.float32, None), (torch.bfloat16, bias), (torch.float16, bias)]:
            got = cpu.int_linear(xq, xs, wq, ws, b, a_bits, w_bits, out_dtype)
            want = ref.int_linear(xq, xs, wq, ws, b, a_bits, w_bits, out_dtype)
            assert got.dtype == out_dtype and torch.equal(got, want), (m, k, n, out_dtype)


@needs_onednn
def test_extremes_and_leading_dims_and_strides():
    gen = torch.Generator().manual_seed(3)
    for a_bits, w_bits in PAIRS:
        k = ref.fp32_exact_k(a_bits, w_bits) if (a_bits, w_bits) == (8, 8) else 2048
        lo = quant_math.qrange(8)[0]
        xq, xs, wq, ws = _operands(6, k, 4, a_bits, w_bits, gen)
        if (a_bits, w_bits) == (8, 8):  # |acc| = 2**24 exactly: the largest the fp32 output holds
            xq, wq = torch.full_like(xq, lo), torch.full_like(wq, lo)
        x3 = xq.view(2, 3, -1)
        got = cpu.int_linear(x3, xs, wq, ws, None, a_bits, w_bits, torch.float32)
        assert got.shape == (2, 3, 4)
        assert torch.equal(got, ref.int_linear(x3, xs, wq, ws, None, a_bits, w_bits, torch.float32))
    wide = torch.randint(-8, 8, (5, 2 * 96), generator=gen, dtype=torch.int8)[:, ::2]  # a strided activation
    wq = torch.randint(-8, 8, (7, 96), generator=gen, dtype=torch.int8)
    one, ws = torch.ones(1), torch.ones(7)
    assert torch.equal(cpu.int_linear(wide, one, wq, ws, None, 8, 8, torch.float32),
                       ref.int_linear(wide, one, wq, ws, None, 8, 8, torch.float32))  # fmt: skip


@needs_onednn
def test_a_modified_weight_is_repacked():
    gen = torch.Generator().manual_seed(5)
    xq, xs, wq, ws = _operands(9, 64, 8, 8, 8, gen)
    first = cpu.int_linear(xq, xs, wq, ws, None, 8, 8, torch.float32)
    wq.copy_(torch.randint(-128, 128, wq.shape, generator=gen, dtype=torch.int8))
    second = cpu.int_linear(xq, xs, wq, ws, None, 8, 8, torch.float32)
    assert not torch.equal(first, second)
    assert torch.equal(second, ref.int_linear(xq, xs, wq, ws, None, 8, 8, torch.float32))
    key = id(wq)
    del wq
    assert key not in cpu._packed  # freed with its weight


def test_where_it_is_not_used():
    gen = torch.Generator().manual_seed(7)
    xq, _, wq, _ = _operands(2, 1026, 3, 8, 8, gen)
    assert not cpu.usable(xq, wq, 8, 8)  # W8A8 K > 1024: the fp32 accumulator output could round
    xq, _, wq, _ = _operands(2, 64, 3, 4, 4, gen)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not cpu.usable(mode.from_tensor(xq), mode.from_tensor(wq), 4, 4)


@needs_onednn
def test_the_op_dispatches_here_in_eager_and_to_the_reference_when_compiled(monkeypatch):
    calls = []
    matmul = cpu._matmul
    monkeypatch.setattr(cpu, "_matmul", lambda *a: calls.append(1) or matmul(*a))
    gen = torch.Generator().manual_seed(9)
    xq, xs, wq, ws = _operands(4, 128, 6, 4, 4, gen)

    def f(xq, xs, wq, ws):
        return torch.ops.pq_ao.int_linear(xq, xs, wq, ws, None, 4, 4, torch.float32)

    eager = f(xq, xs, wq, ws)
    assert len(calls) == 1
    compiled = torch.compile(f, fullgraph=True)(xq, xs, wq, ws)
    assert len(calls) == 1  # inductor inlined the reference
    assert torch.equal(eager, compiled)
