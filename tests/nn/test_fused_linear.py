"""`FusedLinear`: quantized linears that read one input, as one GEMM, give bitwise the separate linears' outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pq_ao.nn.fused_linear import FusedLinear, fusable
from pq_ao.tensors import IntxLinearWeight


def _linears(widths, k, w_bits, a_bits, act_mode, bias, seed=0, act_scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in widths:
        lin = nn.Linear(k, n, bias=bias)
        w = torch.randn(n, k, generator=gen)
        weight = IntxLinearWeight.from_float(w, w_bits, a_bits, act_mode if a_bits < 16 else "none",
                                             act_scale=act_scale if act_mode == "static" and a_bits < 16 else None,
                                             act_clip=0.9 if act_mode == "dynamic" else None)  # fmt: skip
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if bias:
            lin.bias = nn.Parameter(torch.randn(n, generator=gen), requires_grad=False)
        out.append(lin)
    return out


@pytest.mark.parametrize("w_bits,a_bits,act_mode", [(4, 4, "static"), (4, 8, "static"), (8, 8, "static"),
                                                    (4, 4, "dynamic"), (4, 16, "none")])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_outputs_are_the_separate_outputs(w_bits, a_bits, act_mode, bias):
    widths, k = (48, 16, 16), 64
    linears = _linears(widths, k, w_bits, a_bits, act_mode, bias, seed=w_bits + a_bits)
    fused = FusedLinear.from_linears(linears, ["q", "k", "v"])
    assert fused.weight.shape == (80, k) and fused.out_features == widths
    for shape in ((1, k), (3, 7, k), (2, 1, k)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3
        with torch.no_grad():
            got = fused(x)
            for lin, y in zip(linears, got):
                assert torch.equal(y, lin(x)), (shape, lin.out_features)


def test_unfuse_gives_views_that_compute_the_same():
    linears = _linears((32, 16), 64, 4, 4, "static", True)
    fused = FusedLinear.from_linears(linears, ["gate_proj", "up_proj"])
    parts = fused.unfuse()
    x = torch.randn(5, 64)
    with torch.no_grad():
        for lin, part, y in zip(linears, parts, fused(x)):
            assert torch.equal(part(x), lin(x)) and torch.equal(part(x), y)
    base = fused.weight.qdata.untyped_storage().data_ptr()
    assert all(p.weight.qdata.untyped_storage().data_ptr() == base for p in parts)  # views, no copy
    assert parts[1].weight.qdata.data_ptr() == base + 32 * 32


def test_what_cannot_be_fused_says_why():
    static = _linears((16, 16), 64, 4, 4, "static", False)
    other_scale = _linears((16,), 64, 4, 4, "static", False, act_scale=0.07)
    assert fusable(static) is None
    assert "quantized differently" in fusable(static + other_scale)
    assert "quantized differently" in fusable(static + _linears((16,), 64, 4, 8, "static", False))
    assert "bias" in fusable(static + _linears((16,), 64, 4, 4, "static", True))
    assert "IntxLinearWeight" in fusable(static + [nn.Linear(64, 16)])
    assert "fewer than two" in fusable(static[:1])
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedLinear.from_linears(static + other_scale, ["a", "b", "c"])
    with pytest.raises(ValueError, match="quantizes its input differently"):
        IntxLinearWeight.concat([static[0].weight, other_scale[0].weight])
    with pytest.raises(ValueError, match="outside"):
        static[0].weight.out_rows(8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton / fp8 paths)")
def test_fused_outputs_match_on_cuda():
    """On CUDA every path of `static_linear` (the fused-quantize GEMV at one row, the int GEMM, the fp8 tensor-core
    path from 512 rows): the fused linear's outputs are the separate linears' (bitwise on the integer paths, within
    one bf16 rounding where `_scaled_mm` runs the epilogue)."""
    linears = [lin.cuda().to(torch.bfloat16) for lin in _linears((256, 64, 64), 512, 4, 4, "static", False)]
    fused = FusedLinear.from_linears(linears, ["q", "k", "v"])
    for m in (1, 3, 40, 600):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).cuda().to(torch.bfloat16)
        with torch.no_grad():
            for lin, y in zip(linears, fused(x)):
                want = lin(x)
                if m < 512:
                    assert torch.equal(y, want), m
                else:
                    assert ((y.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-3).all(), m
