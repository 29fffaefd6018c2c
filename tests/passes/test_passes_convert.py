"""`passes/convert.py`: a calibrated linear becomes an `nn.Linear` whose weight is an `IntxLinearWeight`, computing
what calibration measured (the online Hadamard moves from the module into the weight)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pq_ao import quant_math
from pq_ao.nn.hadamard_linear import HadamardLinear
from pq_ao.passes.convert import quantize_linear, replace_child
from pq_ao.tensors import IntxLinearWeight


def test_static_linear_keeps_its_module_and_bias():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(32, 8)
    x = torch.randn(5, 32, generator=gen)
    s = torch.tensor([0.1])
    out = quantize_linear(lin, w_bits=4, a_bits=4, act_mode="static", act_scale=s)
    assert out is lin and isinstance(lin.weight, IntxLinearWeight) and lin.weight.act_mode == "static"
    w = lin.weight.dequantize()
    want = quant_math.fake_quantize(x, s, 4) @ w.T + lin.bias
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_an_online_hadamard_moves_into_the_weight():
    gen = torch.Generator().manual_seed(1)
    had = HadamardLinear.from_linear(nn.Linear(48, 6))
    x = torch.randn(4, 48, generator=gen)
    ref = had(x)
    out = quantize_linear(had, w_bits=8, a_bits=16, act_mode="static")  # weight-only: close to the float module
    assert type(out) is nn.Linear and out is not had and out.weight.had_k is not None
    assert out.bias is had.bias
    assert (out(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_replace_child_swaps_a_direct_child_only():
    parent = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    new = nn.Linear(2, 2)
    replace_child(parent, parent[0], new)
    assert parent[0] is new
    with pytest.raises(ValueError, match="not a direct child"):
        replace_child(parent, parent[1][0], nn.Linear(2, 2))


def test_convert_site_builds_the_weights_from_the_plan():
    from pq_ao.passes.convert import SitePlan, convert_site

    lins = [nn.Linear(16, 4), nn.Linear(16, 6)]
    originals = [lin.weight.detach().clone() for lin in lins]
    clips = [torch.full((4,), 0.9), None]
    static = convert_site(lins, SitePlan(act_absmax=3.0, weight_clips=clips), w_bits=4, a_bits=4, act_mode="static")
    assert all(m.weight.act_scale.item() == pytest.approx(6.0 / 15) for m in static)  # min-max: 2 * absmax / 15
    torch.testing.assert_close(static[0].weight.scale, quant_math.per_channel_scale(originals[0], 4) * 0.9)
    torch.testing.assert_close(static[1].weight.scale, quant_math.per_channel_scale(originals[1], 4))
    dyn = convert_site([nn.Linear(16, 4)], SitePlan(act_absmax=3.0, weight_clips=[None]), w_bits=4, a_bits=4,
                       act_mode="dynamic")  # fmt: skip
    assert dyn[0].weight.act_scale is None and dyn[0].weight.act_clip.item() == 1.0
