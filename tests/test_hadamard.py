import math

import pytest
import torch

from pq_ao.hadamard import (
    QUAROT_K,
    RandomHadamard,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    has_true_hadamard,
    random_hadamard,
    sylvester,
)


def _dense(n):
    k, had_k = hadamard_factor(n)
    return torch.kron(had_k, sylvester(n // k)) / math.sqrt(n)


@pytest.mark.parametrize("k", QUAROT_K + (44, 76, 2, 4))
def test_hadamard_matrix_is_hadamard(k):
    h = hadamard_matrix(k)
    assert h.shape == (k, k) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", [3, 6, 10, 92])
def test_hadamard_matrix_unknown_order(k):
    with pytest.raises(ValueError, match=f"order {k}"):
        hadamard_matrix(k)


@pytest.mark.parametrize(
    "n, k",
    [
        (64, 1),
        (576, 36),
        (1536, 12),
        (172, 172),
        (14336, 28),
        (11008, 172),
        (13824, 108),
        (18944, 148),
        (8960, 140),
        (4864, 76),
        (5632, 44),
        (160, 20),
        (40 * 8, 20),
        (156 * 2, 156),
        (52 * 4, 52),
        (60, 60),
    ],
)
def test_hadamard_factor(n, k):
    got_k, had_k = hadamard_factor(n)
    assert got_k == k and has_true_hadamard(n)
    assert torch.equal(had_k @ had_k.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("n", [70, 90, 35, 3 * 128])
def test_fallback_is_orthogonal_and_deterministic(n):
    if n == 3 * 128:  # 12 * 32: has a true Hadamard, no fallback
        assert has_true_hadamard(n)
        return
    k, had_k = hadamard_factor(n)
    odd = n >> ((n & -n).bit_length() - 1)
    assert k == odd and not has_true_hadamard(n)
    torch.testing.assert_close(had_k @ had_k.T, k * torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.equal(had_k.abs(), torch.ones_like(had_k))
    assert torch.equal(hadamard_factor(n)[1], had_k)
    q = _dense(n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 2048])
def test_fwht_matches_sylvester(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(n), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n", [64, 576, 1536, 172, 160, 70, 28 * 64])
def test_transform_contract(n):
    """x.view(..., K, 2**m) -> WHT over the last dim -> had_k over K -> 1/sqrt(n) == x @ H_n.T, H_n = had_k (x) H."""
    k, had_k = hadamard_factor(n)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    y = hadamard_transform(x, had_k)
    manual = torch.matmul(had_k, fwht(x.view(4, 3, k, n // k))).reshape(4, 3, n) / math.sqrt(n)
    torch.testing.assert_close(y, manual, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ _dense(n).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(y, had_k.T), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_transform_dtypes_and_errors():
    k, had_k = hadamard_factor(1536)
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(0))
    ref = hadamard_transform(x.double(), had_k)
    assert hadamard_transform(x, had_k.float()).dtype == torch.float32
    torch.testing.assert_close(hadamard_transform(x, had_k.float()).double(), ref, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    yb = hadamard_transform(xb, had_k)
    assert yb.dtype == torch.bfloat16
    # bf16 is computed in fp32 and rounded once: exactly the fp32 transform rounded, and within one bf16 ulp of the
    # fp64 value rounded (fp32's own error can cross a bf16 rounding boundary: seen once in 7680 values)
    assert torch.equal(yb, hadamard_transform(xb.float(), had_k.float()).bfloat16())
    exact = hadamard_transform(xb.double(), had_k).bfloat16().double()
    assert ((yb.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-30).all()
    torch.testing.assert_close(hadamard_transform(x[:, :64]), hadamard_transform(x[:, :64], torch.ones(1, 1)))
    with pytest.raises(ValueError, match="K \\* 2\\*\\*m"):
        hadamard_transform(torch.randn(3, 100), had_k)
    with pytest.raises(ValueError, match="power-of-2"):
        fwht(torch.randn(3, 12))


@pytest.mark.parametrize("n", [64, 576, 70])
def test_random_hadamard(n):
    q = random_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.equal(q, random_hadamard(n, seed=4))
    if has_true_hadamard(n):
        torch.testing.assert_close(q.abs(), torch.full_like(q, 1 / math.sqrt(n)))
    r = RandomHadamard.from_seed(n, 3)
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(r.right(x), x @ q)
    torch.testing.assert_close(r.right_t(x), x @ q.T)
