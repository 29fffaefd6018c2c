"""The quantization grid against an independent numpy oracle (fp32 IEEE division, rint = half-to-even)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pq_ao import quant_math as qm


def np_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = x.float().numpy() / np.broadcast_to(scale.float().numpy(), x.shape).astype(np.float32)
    return torch.from_numpy(np.clip(np.rint(v), lo, hi).astype(np.int8))


def test_qrange_and_bits():
    assert qm.qrange(4) == (-8, 7) and qm.qrange(8) == (-128, 127)
    for bad in (2, 3, 16, 0):
        with pytest.raises(ValueError, match="bits must be one of"):
            qm.qrange(bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_from_absmax_minmax_grid(bits):
    gen = torch.Generator().manual_seed(bits)
    absmax = torch.rand(50, generator=gen) * 10 + 1e-3
    s = qm.scale_from_absmax(absmax, bits)
    assert s.dtype == torch.float32 and s.shape == absmax.shape
    want = (absmax.double() * 2 / (2**bits - 1)).float()
    torch.testing.assert_close(s, want, rtol=2**-23, atol=0)
    # +absmax lands half a step above qmax (clipped), -absmax on qmin - 1/2 (up to the scale's rounding)
    lo, hi = qm.qrange(bits)
    torch.testing.assert_close(absmax / s, torch.full_like(s, hi + 0.5), rtol=3e-7, atol=0)
    x = torch.stack([absmax, -absmax], -1)
    q = qm.quantize(x, s[:, None], bits)
    assert (q[:, 0] == hi).all() and ((q[:, 1] == lo) | (q[:, 1] == lo + 1)).all()


def test_scale_clip_and_zero_floor():
    a = torch.tensor([0.0, 1.0, 3.0])
    s = qm.scale_from_absmax(a, 4, clip=0.5)
    torch.testing.assert_close(s[1:], torch.tensor([1.0, 3.0]) / 15, rtol=1e-6, atol=0)
    assert s[0] > 0 and torch.isfinite(qm.quantize(torch.zeros(3), s, 4).float()).all()
    clip = torch.tensor([1.0, 0.5, 0.25])
    torch.testing.assert_close(qm.scale_from_absmax(a, 8, clip)[1:], torch.tensor([0.5, 0.75]) * 2 / 255)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_numpy(bits, dtype):
    gen = torch.Generator().manual_seed(7 * bits)
    x = (torch.randn(37, 53, generator=gen) * 3).to(dtype)
    scale = torch.rand(37, 1, generator=gen) * 0.3 + 0.01
    q = qm.quantize(x, scale, bits)
    assert q.dtype == torch.int8
    assert torch.equal(q, np_quantize(x, scale, bits))


def test_round_half_even_ties():
    s = torch.tensor([0.5])
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 3.75, -4.25])  # x / s = k + 1/2 exactly
    assert qm.quantize(x, s, 4).tolist() == [0, 2, 2, 0, -2, -2, 7, -8]


def test_division_not_reciprocal():
    # x with x / s a tie exactly while x * (1 / s) is not: a reciprocal multiply would round differently.
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(20000):
        s = np.float32(rng.uniform(0.01, 1.0))
        v = np.float32(rng.integers(-7, 7) + 0.5)
        x = np.float32(v * s)
        if x / s == v and x * (np.float32(1) / s) != v:
            q = qm.quantize(torch.tensor([x]), torch.tensor([s]), 4)
            assert q.item() == np.rint(v), (x, s, v)
            found += 1
    assert found > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_and_fake_quantize(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 31, generator=gen).to(dtype)
    s = qm.per_token_scale(x, 4)
    assert s.shape == (9, 1) and s.dtype == torch.float32
    q = qm.quantize(x, s, 4)
    want = (q.double() * s.double()).to(dtype)  # q * s is exact in fp32 for 4-bit q
    assert torch.equal(qm.dequantize(q, s, dtype), want)
    fq = qm.fake_quantize(x, s, 4)
    assert fq.dtype == dtype and torch.equal(fq, want)
    with pytest.raises(TypeError, match="unpacked int8"):
        qm.dequantize(qm.pack_int4(q[:, :30]), s)


def test_fake_quantize_ste_gradients():
    x = torch.tensor([[0.1, 0.26, -0.7, 5.0, -5.0]], requires_grad=True)
    s = torch.tensor([[0.1]], requires_grad=True)
    y = qm.fake_quantize(x, s, 4, ste=True)
    assert torch.equal(y, qm.fake_quantize(x.detach(), s.detach(), 4))
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]  # straight through inside the grid, 0 where clamped
    # d/ds of s * clamp(round_ste(x / s)): (q - x/s) inside, qmax / qmin outside
    want = sum([1 - 1.0, 3 - 2.6, -7 + 7.0, 7.0, -8.0])
    assert s.grad.item() == pytest.approx(want, abs=1e-5)
    x.grad = None
    qm.fake_quantize(x, s.detach(), 4).sum().backward()
    assert x.grad is None or (x.grad == 0).all()


def test_per_channel_scale():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 10, generator=gen)
    clip = torch.linspace(0.5, 1.0, 6)
    s = qm.per_channel_scale(w, 4, clip)
    assert s.shape == (6,)
    torch.testing.assert_close(s, w.abs().amax(1) * clip * 2 / 15)
    with pytest.raises(ValueError, match="one factor per output channel"):
        qm.per_channel_scale(w, 4, torch.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        qm.per_channel_scale(w[0], 4)


def test_pack_int4_layout_and_round_trip():
    q = torch.tensor([1, -2, 7, -8], dtype=torch.int8)
    p = qm.pack_int4(q)
    assert p.dtype == torch.uint8 and p.tolist() == [0xE1, 0x87]  # element 2i in the low nibble
    every = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(every, every).to(torch.int8)  # all 256 bytes
    assert torch.equal(qm.unpack_int4(qm.pack_int4(pairs)), pairs)
    assert sorted(qm.pack_int4(pairs).view(-1).tolist()) == list(range(256))
    gen = torch.Generator().manual_seed(0)
    for shape in [(2,), (3, 18), (2, 5, 34), (1, 1030)]:
        q = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
        p = qm.pack_int4(q)
        assert p.shape == (*shape[:-1], shape[-1] // 2)
        assert torch.equal(qm.unpack_int4(p), q)
        strided = torch.stack((q, q), -1)[..., 0]  # last-dim stride 2
        assert torch.equal(qm.unpack_int4(qm.pack_int4(strided)), q)


def test_pack_int4_errors():
    with pytest.raises(ValueError, match="even last dim"):
        qm.pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        qm.pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        qm.unpack_int4(torch.zeros(4, dtype=torch.int8))
