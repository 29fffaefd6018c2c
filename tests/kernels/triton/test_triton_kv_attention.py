"""Triton decode attention over a packed int4 / int8 KV cache == the reference, to within its rounding.

The kernel sums in another order (tensor-core dots, online softmax over blocks, split-S partials merged by
their log-sum-exp) and rounds p to q's dtype before p @ v (flash attention does), so it matches to about fp32
precision for fp32 q and to about one rounding of bf16 / fp16 otherwise, not bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from pq_triton_testutil import cases, poison, through_aoti

from pq_ao import quant_math
from pq_ao.kernels import reference
from pq_ao.kernels import triton as tk
from pq_ao.kernels.triton.attention import (
    MAX_ROWS,
    AttnConfig,
    kv_attention_with_config,
    pick_block_s,
    pick_splits,
)

# (B, Hq, Hkv, Tq, S, P, D, bits, dtype, config): S off the block size, Tq up to 16, P = 0, GQA groups of 1-4,
# fp32 / bf16 / fp16 q, one split and many (config None: the launcher's choice)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CPU_CASES = [
    (2, 4, 4, 1, 1, 0, 32, 4, FP32, None),
    (2, 6, 2, 3, 100, 0, 64, 4, BF16, AttnConfig(block_s=32, num_splits=1)),
    (2, 9, 3, 2, 130, 17, 64, 4, FP16, AttnConfig(block_s=32, num_splits=3)),
    (3, 8, 2, 1, 77, 4, 32, 4, FP32, AttnConfig(block_s=16, num_splits=2, skip_masked=False)),
    (1, 4, 1, 16, 40, 2, 32, 4, BF16, None),
    (2, 4, 2, 5, 200, 3, 128, 4, BF16, None),
    (2, 6, 2, 3, 100, 1, 64, 8, FP32, AttnConfig(block_s=32, num_splits=1)),
    (1, 8, 2, 2, 150, 0, 32, 8, BF16, None),
    (1, 2, 2, 1, 33, 2, 40, 8, FP32, AttnConfig(block_s=16)),  # D not a power of 2
    (1, 2, 1, 1, 0, 3, 32, 4, BF16, None),  # no cache slots: the prefix alone
]


def _random_cases(n, seed, s_max, d_choices):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        hq, hkv = rng.choice([(4, 4), (6, 2), (9, 3), (8, 1), (32, 8)])
        tq = rng.choice([1, 1, 2, 3, 5]) if hq // hkv <= 8 else 1
        cfg = rng.choice([None, AttnConfig(block_s=rng.choice([16, 32, 64]), num_splits=rng.randint(1, 5),
                                           skip_masked=rng.random() < 0.5)])
        out.append((rng.randint(1, 3), hq, hkv, tq, rng.randint(1, s_max), rng.randint(0, 5),
                    rng.choice(d_choices), rng.choice([4, 8]), rng.choice([BF16, FP32, FP16]), cfg))
    return out


CPU_CASES += _random_cases(12, 0, 300, [32, 64])
GPU_CASES = [
    (1, 32, 8, 1, 2048, 4, 128, 4, BF16, None),
    (16, 32, 8, 1, 8192, 4, 128, 4, BF16, None),
    (4, 32, 8, 1, 8191, 4, 128, 4, BF16, None),
    (2, 32, 8, 4, 4000, 16, 128, 4, BF16, None),
    (3, 32, 8, 16, 1000, 0, 128, 4, BF16, None),
    (2, 32, 8, 1, 5000, 4, 128, 4, FP16, None),
    (2, 32, 8, 1, 3000, 4, 128, 4, FP32, None),
    (2, 32, 8, 1, 8192, 4, 128, 8, BF16, None),
    (2, 32, 8, 2, 1000, 4, 128, 8, FP32, None),
    (5, 12, 4, 3, 777, 5, 64, 4, BF16, None),
    (2, 8, 8, 1, 300, 33, 32, 4, BF16, None),
    (1, 14, 2, 1, 1500, 2, 64, 4, BF16, AttnConfig(block_s=128, num_warps=8)),
    (2, 32, 8, 1, 4096, 4, 128, 4, BF16, AttnConfig(block_s=32, num_splits=1, num_stages=2)),
    (2, 32, 8, 1, 4096, 4, 128, 4, BF16, AttnConfig(skip_masked=False)),
    (1, 6, 2, 2, 100, 3, 80, 8, BF16, None),
] + _random_cases(20, 1, 9000, [64, 128])


def _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed):
    """Uniform codes, per-head scales, a bf16 prefix; a mask with each batch's own length (padding), a causal
    last block of queries, and query 0 of batch 0 seeing no slot at all (only the prefix, or nothing)."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = quant_math.qrange(bits)
    codes = [torch.randint(qmin, qmax + 1, (b, hkv, s, d), generator=gen, dtype=torch.int8) for _ in range(2)]
    if bits == 4:
        codes = [quant_math.pack_int4(c) for c in codes]
    unit = 0.3 if bits == 4 else 0.3 / 16
    lengths = torch.randint(max(1, s // 2), s + 1, (b,), generator=gen) if s else torch.zeros(b).long()
    slots = torch.arange(s)
    causal = slots[None, :] <= (lengths[:, None, None] - tq + torch.arange(tq)[None, :, None])
    mask = causal & (slots < lengths[:, None, None])
    mask[0, 0] = False
    args = (
        (torch.randn(b, hq, tq, d, generator=gen) * 2).to(dtype),
        codes[0], codes[1],
        (torch.rand(hkv, generator=gen) + 0.5) * unit,
        (torch.rand(hkv, generator=gen) + 0.5) * unit,
        (torch.randn(1, hkv, p, d, generator=gen) * 2).bfloat16(),
        torch.randn(1, hkv, p, d, generator=gen).bfloat16(),
        mask,
    )
    return tuple(a.to(device) for a in args), d**-0.5, bits


def _v_max(args, bits):
    """[B, Hq, 1, 1]: the largest |v| (prefix or dequantized cache) that each query head reads."""
    q, _, v_codes, _, v_scale, _, prefix_v, _ = (a.cpu() for a in args)
    v = (quant_math.unpack_int4(v_codes) if bits == 4 else v_codes).float() * v_scale[None, :, None, None]
    zero = torch.zeros(*v.shape[:2], 1, v.shape[3])
    vals = torch.cat((prefix_v.float().expand(v.shape[0], -1, -1, -1), v, zero), dim=2)
    return vals.abs().amax(dim=(2, 3)).repeat_interleave(q.shape[1] // v.shape[1], dim=1)[..., None, None]


def _check(y, want, v_max, what):
    """fp32: each row within 5e-5 of its norm. bf16/fp16: each element within one rounding of the result plus
    one rounding of p (at most eps * the largest |v| of the head), and 1e-2 (bf16) / 2e-3 (fp16) of each row's
    norm (about 4x what the roundings give)."""
    assert y.dtype == want.dtype and y.shape == want.shape, (y.dtype, y.shape, want.shape)
    y, want, dtype = y.cpu().float(), want.float(), want.dtype
    assert not torch.isnan(y).any(), f"{what}: NaN in the output (unwritten elements?)"
    empty = want.abs().amax(-1) == 0
    assert (y[empty] == 0).all(), f"{what}: rows that see nothing must be 0"
    err = ((y - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30))[~empty]
    worst = float(err.max()) if err.numel() else 0.0
    if dtype == torch.float32:
        assert worst < 5e-5, f"{what}: relative error {worst:.3g}"
        return
    assert worst < (1e-2 if dtype == torch.bfloat16 else 2e-3), f"{what}: relative error {worst:.3g}"
    eps = torch.finfo(dtype).eps
    bad = (y - want).abs() > eps * want.abs() + eps * v_max + 1e-6
    assert not bad.any(), f"{what}: {int(bad.sum())} of {y.numel()} elements off by more than the roundings"


@pytest.mark.parametrize("device,case", cases(CPU_CASES, GPU_CASES))
def test_kv_attention_matches_reference(device, case):
    b, hq, hkv, tq, s, p, d, bits, dtype, cfg = case
    args, scaling, bits = _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed=hash(case[:8]) % 1000)
    cpu_args = tuple(a.cpu() for a in args)
    want = reference.kv_attention(*cpu_args, scaling, bits)
    poison(device, want.numel() * want.element_size())
    y = kv_attention_with_config(*args, scaling, bits, cfg)
    _check(y, want, _v_max(args, bits), f"{case}")


@pytest.mark.parametrize("device,case", cases([(2, 4, 2, 1, 20, 2, 32, 4, BF16, None)],
                                              [(4, 32, 8, 1, 4096, 4, 128, 4, BF16, None)]))
def test_noncontiguous_operands(device, case):
    """q as attention produces it ([B, T, H, D] transposed), a mask broadcast over the batch."""
    b, hq, hkv, tq, s, p, d, bits, dtype, _ = case
    args, scaling, bits = _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed=3)
    q = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    mask = args[7][-1:].expand(b, -1, -1)
    args = (q, *args[1:7], mask)
    want = reference.kv_attention(*(a.cpu() for a in args), scaling, bits)
    _check(tk.kv_attention(*args, scaling, bits), want, _v_max(args, bits), "non-contiguous")


def test_large_groups_run_the_reference():
    """G * Tq > MAX_ROWS does not fit one tile: the launcher hands it to the reference (same result)."""
    args, scaling, bits = _inputs(1, MAX_ROWS + 8, 1, 1, 10, 1, 32, 4, FP32, "cpu", seed=4)
    assert torch.equal(tk.kv_attention(*args, scaling, bits), reference.kv_attention(*args, scaling, bits))


def test_pick_splits_fills_the_gpu():
    assert [pick_block_s(b * 8, s) for b in (1, 16) for s in (2048, 8192)] == [64, 128, 128, 128]
    assert pick_splits(16 * 8, 8192, 64) == 4  # 512 programs
    assert pick_splits(8, 2048, 64) == 16  # 128 programs, 2 steps each
    assert pick_splits(8, 8192, 64) == 50
    assert pick_splits(128 * 8, 512, 64) == 1
    assert pick_splits(8, 1, 64) == 1


@pytest.mark.parametrize("device,case", cases([], [(4, 32, 8, 1, 3000, 4, 128, 4, BF16, None)]))
def test_op_compiles_on_cuda(device, case):
    """torch.compile(fullgraph) of a function calling the op: inductor compiles the wrapped Triton kernels."""
    b, hq, hkv, tq, s, p, d, bits, dtype, _ = case
    args, scaling, bits = _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed=9)

    def step(*a):
        return torch.ops.pq_ao.kv_attention(*a, scaling, bits).transpose(1, 2).flatten(2)

    torch.compiler.reset()
    got = torch.compile(step, fullgraph=True)(*args)
    want = reference.kv_attention(*(a.cpu() for a in args), scaling, bits)
    _check(got.unflatten(2, (hq, d)).transpose(1, 2), want, _v_max(args, bits), "compiled")


# SmolLM2-135M decode (9 / 3 heads of 64, a 3-token prefix, fp32) at a cache of one split and of two (combine
# kernel), and Llama-3-8B decode
AOTI_CASES = [(1, 9, 3, 1, 64, 3, 64, 4, FP32, None), (1, 9, 3, 1, 256, 3, 64, 4, FP32, None),
              (1, 9, 3, 1, 256, 1, 64, 4, FP32, None), (4, 32, 8, 1, 3000, 4, 128, 4, BF16, None)]  # fmt: skip


@pytest.mark.parametrize("device,case", cases([], AOTI_CASES))
def test_op_through_aoti_on_cuda(device, case, tmp_path):
    """torch.export + AOTInductor of the op, loaded back: the packaged kernels give the eager launch's output."""
    b, hq, hkv, tq, s, p, d, bits, dtype, _ = case
    args, scaling, bits = _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed=10)

    def step(*a):
        return torch.ops.pq_ao.kv_attention(*a, scaling, bits)

    got = through_aoti(step, args, tmp_path / "kv_attention.pt2")(*args)
    want = step(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,case", cases([], [(1, 9, 3, 1, 256, 3, 64, 4, FP32, None)]))
@pytest.mark.parametrize("contiguous", [True, False])
def test_constant_prefix_through_aoti_on_cuda(device, case, contiguous, tmp_path):
    """The prefix KV as constants of the package (as in a model), contiguous and as the transposed view a model's
    V is: the packaged kernel reads the values eager does. (Non-contiguous prefix constants are the suspect of the
    wrong SmolLM2 package of 2026-12-02; `PrefixAttention.set_prefix` now stores contiguous copies.)"""
    b, hq, hkv, tq, s, p, d, bits, dtype, _ = case
    (q, k, v, ks, vs, pk, pv, mask), scaling, bits = _inputs(b, hq, hkv, tq, s, p, d, bits, dtype, device, seed=11)
    if not contiguous:
        pk, pv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (pk, pv))
        assert not pv.is_contiguous()

    def step(q, k, v, ks, vs, mask):
        return torch.ops.pq_ao.kv_attention(q, k, v, ks, vs, pk, pv, mask, scaling, bits)

    args = (q, k, v, ks, vs, mask)
    got = through_aoti(step, args, tmp_path / "kv_attention.pt2")(*args)
    torch.testing.assert_close(got, step(*args), rtol=1e-5, atol=1e-5)
