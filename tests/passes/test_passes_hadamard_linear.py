import pytest
import torch
from torch import nn

from pq_ao.hadamard import hadamard_factor, hadamard_transform
from pq_ao.nn.hadamard_linear import HadamardLinear


@pytest.mark.parametrize("n, bias", [(172, True), (160, False), (64, True), (70, False)])
def test_from_linear_computes_the_same(n, bias):
    lin = nn.Linear(n, 24, bias=bias).double()
    had = HadamardLinear.from_linear(lin)
    assert had.had_k.shape == (hadamard_factor(n)[0],) * 2 and had.had_k.dtype == torch.float32
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(had(x), lin(x), rtol=1e-6, atol=1e-6)  # had_k is kept in float32
    torch.testing.assert_close(had.weight, hadamard_transform(lin.weight, hadamard_factor(n)[1]))


def test_state_dict_is_linear_plus_had_k():
    lin = nn.Linear(160, 8)
    had = HadamardLinear.from_linear(lin)
    assert set(had.state_dict()) == set(lin.state_dict()) | {"had_k"}
    fresh = HadamardLinear(160, 8)
    fresh.load_state_dict(had.state_dict())
    x = torch.randn(4, 160)
    torch.testing.assert_close(fresh(x), lin(x), rtol=1e-5, atol=1e-5)
    assert "K=20" in repr(had)


def test_uses_the_registered_op():
    """The online transform is `pq_ao::hadamard_transform`, so compile / export keep the op (and CUDA its kernel)."""
    lin = HadamardLinear.from_linear(nn.Linear(64, 8))
    ep = torch.export.export(lin, (torch.randn(3, 64),))
    assert "pq_ao.hadamard_transform.default" in {str(n.target) for n in ep.graph.nodes}


def test_bf16_runs_the_transform_in_fp32():
    lin = nn.Linear(172, 16).bfloat16()
    had = HadamardLinear.from_linear(lin)
    x = torch.randn(2, 172).bfloat16()
    y = had(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lin.float()(x.float()), rtol=0.05, atol=0.05)
