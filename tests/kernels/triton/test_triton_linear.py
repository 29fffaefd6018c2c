"""Triton integer linear == reference: the int32 accumulation exactly, the epilogue within one rounding."""

from __future__ import annotations

import pytest
import torch
from pq_triton_testutil import DEVICES, assert_one_rounding, cases, poison, through_aoti

from pq_ao import quant_math
from pq_ao.hadamard import hadamard_factor
from pq_ao.kernels import ops, reference
from pq_ao.kernels import triton as tk
from pq_ao.kernels.triton.gemm import GemmConfig, gemv_config, int_linear_with_config

BITS = [(4, 4), (8, 4), (8, 8), (4, 8)]  # (a_bits, w_bits)
LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]

# (M, N, K): K and N off the block sizes, M from 1 up; the default configuration for each
CPU_SHAPES = [(1, 24, 70), (3, 40, 200), (17, 33, 1030), (40, 64, 256)]
GPU_SHAPES = ([(m, n, k) for (n, k) in LLAMA for m in (1, 3, 16, 17, 130, 2048)]
              + [(m, 1000, 1030) for m in (1, 5, 16, 64, 300, 8192)] + [(8192, 4096, 4096), (8192, 4096, 14336)]
              + [(m, 40, 72) for m in (1, 9, 300)])

# configurations that the heuristic may not pick on these shapes: split-K, interleaved W4A4, tiny tiles
CPU_CONFIGS = [
    (GemmConfig(16, 16, 64, num_warps=4, num_stages=2, split_k=3), (5, 40, 300)),
    (GemmConfig(32, 16, 128, num_warps=4, num_stages=2, split_nibbles=False), (33, 17, 512)),
    (GemmConfig(16, 32, 32, num_warps=4, num_stages=2, group_m=2), (33, 17, 300)),
]
GPU_CONFIGS = [
    (GemmConfig(16, 64, 512, num_warps=4, num_stages=4, split_k=4), (1, 1024, 4096)),
    (GemmConfig(16, 64, 512, num_warps=4, num_stages=4, split_k=4), (7, 4096, 14336)),
    (GemmConfig(128, 128, 128, num_warps=8, num_stages=3, split_nibbles=False), (300, 1000, 1030)),
    (GemmConfig(64, 64, 64, num_warps=4, num_stages=2, group_m=4), (300, 1000, 1030)),
]


def _operand(rows, k, bits, device, gen):
    qmin, qmax = quant_math.qrange(bits)
    q = torch.randint(qmin, qmax + 1, (rows, k), generator=gen, dtype=torch.int8)
    return (quant_math.pack_int4(q) if bits == 4 else q).to(device)


def _check(m, n, k, a_bits, w_bits, device, gen, cfg=None, what="", all_epilogues=True):
    xq = _operand(m, k, a_bits, device, gen)
    wq = _operand(n, k, w_bits, device, gen)
    run = (lambda *a: int_linear_with_config(*a, cfg)) if cfg is not None else tk.int_linear
    # 1) the integer result, exactly: unit scales, fp32 output (|acc| < 2**24 here)
    ones_x = torch.ones(1, device=device)
    ones_w = torch.ones(n, device=device)
    want = reference.int_linear(xq, ones_x, wq, ones_w, None, a_bits, w_bits, torch.float32)
    poison(device, m * n * 4)
    got = run(xq, ones_x, wq, ones_w, None, a_bits, w_bits, torch.float32)
    assert torch.equal(got, want), f"{what}: integer results differ in {int((got != want).sum())} of {got.numel()}"
    # 2) per-token / per-tensor scales, bias, bf16 / fp16 / fp32 output: within one rounding
    w_scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    epilogues = [
        (torch.rand(1, generator=gen).to(device) * 0.1 + 0.01, None, torch.bfloat16),
        (torch.rand(m, 1, generator=gen).to(device) * 0.1 + 0.01, bias, torch.bfloat16),
        (torch.rand(m, 1, generator=gen).to(device) * 0.1 + 0.01, bias.bfloat16(), torch.float16),
        (torch.rand(1, generator=gen).to(device) * 0.1 + 0.01, bias, torch.float32),
    ]
    for x_scale, b, dtype in epilogues if all_epilogues else epilogues[:1]:
        ref32 = reference.int_linear(xq, x_scale, wq, w_scale, b, a_bits, w_bits, torch.float32)
        terms = reference.int_linear(xq, x_scale, wq, w_scale, None, a_bits, w_bits, torch.float32).abs()
        if b is not None:
            terms = terms + b.float().abs()
        poison(device, m * n * dtype.itemsize)
        y = run(xq, x_scale, wq, w_scale, b, a_bits, w_bits, dtype)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_one_rounding(y, ref32, f"{what} x_scale {list(x_scale.shape)} bias {b is not None} {dtype}", terms)


@pytest.mark.parametrize("device,shape", cases(CPU_SHAPES, GPU_SHAPES))
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_int_linear_matches_reference(device, shape, a_bits, w_bits):
    m, n, k = shape
    gen = torch.Generator().manual_seed(31 * a_bits + w_bits + m + n + k)
    # all four epilogues on a few shapes (each is a compile on the GPU), the plain one elsewhere
    full = device == "cpu" or m in (3, 130) or n == 1000
    _check(m, n, k, a_bits, w_bits, device, gen, what=f"W{w_bits}A{a_bits} {m}x{n}x{k}", all_epilogues=full)


@pytest.mark.parametrize("device,cfg_shape", cases(CPU_CONFIGS, GPU_CONFIGS))
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_int_linear_configs(device, cfg_shape, a_bits, w_bits):
    """Split-K (atomic partial sums + last-program epilogue), interleaved W4A4, small tiles."""
    cfg, (m, n, k) = cfg_shape
    gen = torch.Generator().manual_seed(7 * a_bits + w_bits)
    _check(m, n, k, a_bits, w_bits, device, gen, cfg, what=f"{cfg} W{w_bits}A{a_bits} {m}x{n}x{k}",
           all_epilogues=False)


CPU_GEMV = [(1, 40, 264, 16, 128, 1), (3, 24, 520, 16, 128, 3)]  # (M, N, K, block_n, block_k, split_k)
GPU_GEMV = [(m, n, k, 32, 512, s) for (n, k) in LLAMA + [(1000, 1032)] for m in (1, 4) for s in (0, 1)] + [
    (2, 4096, 4096, 64, 1024, 0), (5, 4096, 4096, 32, 512, 0)]


@pytest.mark.parametrize("device,case", cases(CPU_GEMV, GPU_GEMV))
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_int_linear_dp4a_gemv(device, case, a_bits, w_bits):
    """The CUDA-core dp4a GEMV (M <= 8, K % 8 == 0), with and without split-K, K off the block size."""
    m, n, k, bn, bk, split = case
    gen = torch.Generator().manual_seed(11 * a_bits + w_bits + m + n)
    cfg = gemv_config(m, n, k, w_bits, block_n=bn, block_k=bk, split_k=split)
    _check(m, n, k, a_bits, w_bits, device, gen, cfg, what=f"{cfg} W{w_bits}A{a_bits} {m}x{n}x{k}",
           all_epilogues=(m == 1 and device == "cpu"))


def test_gemv_tiles_fill_the_multiprocessors_before_splitting_k():
    """Decode shapes: 8-row tiles where 16 would leave the SMs short (no K split, no zeroed workspace), 16 where N
    is large; a K split only where 8 rows still fall short."""
    from pq_ao.kernels.triton import gemm

    per_sm = gemm.GEMV["per_sm"]
    for n, k, want_bn in ((6144, 4096, 8), (4096, 4096, 8), (4096, 14336, 8), (28672, 4096, 16)):
        cfg = gemm.gemv_config(1, n, k, 4)
        assert (cfg.block_n, cfg.split_k) == (want_bn, 1), (n, k, cfg)
        assert n // cfg.block_n >= per_sm * gemm.NUM_SMS
    small = gemm.gemv_config(1, 1024, 4096, 4)
    assert small.block_n == 8 and small.split_k > 1


@pytest.mark.parametrize("device", DEVICES)
def test_int_linear_extreme_values(device):
    """All operands at qmin (the largest products): still exact, no int32 overflow at K = 14336."""
    k = 14336 if device == "cuda" else 2048
    for a_bits, w_bits in BITS:
        qa, qw = quant_math.qrange(a_bits)[0], quant_math.qrange(w_bits)[0]
        xq = torch.full((2, k), qa, dtype=torch.int8)
        wq = torch.full((16, k), qw, dtype=torch.int8)
        xq = (quant_math.pack_int4(xq) if a_bits == 4 else xq).to(device)
        wq = (quant_math.pack_int4(wq) if w_bits == 4 else wq).to(device)
        one = torch.ones(1, device=device)
        y = tk.int_linear(xq, one, wq, torch.ones(16, device=device), None, a_bits, w_bits, torch.float64)
        assert torch.equal(y, torch.full_like(y, float(k * qa * qw))), (a_bits, w_bits)


CPU_STATIC = [(1, 40, 264), (1, 24, 520), (3, 24, 264), (2, 24, 70)]  # the last two: unfused path
GPU_STATIC = [(m, n, k) for (n, k) in LLAMA for m in (1, 2, 4)] + [(5, 4096, 4096), (1, 1000, 1030), (64, 1024, 4096)]


@pytest.mark.parametrize("device,shape", cases(CPU_STATIC, GPU_STATIC))
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_static_linear_matches_quantize_then_linear(device, shape, a_bits, w_bits):
    """Float activations in: the decode GEMV quantizes in registers; same integers as quantize_static + int_linear."""
    m, n, k = shape
    gen = torch.Generator().manual_seed(3 * a_bits + w_bits + m + n + k)
    x = (torch.randn(m, k, generator=gen) * 2).to(torch.bfloat16).to(device)
    x_scale = torch.tensor([float(x.float().abs().max()) / (7.5 if a_bits == 4 else 127.5)], device=device)
    x_scale = x_scale * 0.7  # some clipping
    wq = _operand(n, k, w_bits, device, gen)
    ones = torch.ones(n, device=device)
    xq = reference.quantize_static(x, x_scale, a_bits)
    # integers: unit weight scales, fp32 out, x_scale folded out by comparing to the reference with the same scale
    want = reference.int_linear(xq, x_scale, wq, ones, None, a_bits, w_bits, torch.float32)
    poison(device, m * n * 4)
    got = tk.static_linear(x, x_scale, None, wq, ones, None, a_bits, w_bits, torch.float32)
    assert_one_rounding(got, want, f"static_linear W{w_bits}A{a_bits} {m}x{n}x{k}")
    acc_got = got.double() / float(x_scale)
    acc_want = want.double() / float(x_scale)
    assert torch.allclose(acc_got.round(), acc_want.round()), "integer sums differ"
    w_scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    ref32 = reference.int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, torch.float32)
    terms = reference.int_linear(xq, x_scale, wq, w_scale, None, a_bits, w_bits, torch.float32).abs() + bias.abs()
    y = tk.static_linear(x, x_scale, None, wq, w_scale, bias, a_bits, w_bits, torch.bfloat16)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_one_rounding(y, ref32, f"static_linear W{w_bits}A{a_bits} {m}x{n}x{k} bf16", terms)


# (K, N, online Hadamard): SmolLM2-135M's gate/up and down projections, Llama-3-8B's down projection
LAYER_AOTI = [(576, 1536, False), (1536, 576, True), (14336, 4096, True)]


@pytest.mark.parametrize("device,case", cases([], LAYER_AOTI))
def test_static_layer_ops_through_aoti_on_cuda(device, case, tmp_path):
    """A static W4A4 layer's ops (quantize, or Hadamard + quantize, then the int GEMM) exported with a dynamic row
    count, AOT-compiled and loaded back: the eager outputs at 1 row (decode), 15 and 2048 (prefill)."""
    k, n, online = case
    gen = torch.Generator().manual_seed(k + n)
    wq = _operand(n, k, 4, device, gen)
    w_scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(device)
    had_k = hadamard_factor(k)[1].float().to(device) if online else None
    x_scale = torch.tensor([0.05], device=device)

    def layer(x, x_scale, wq, w_scale):
        if had_k is not None:
            xq = ops.hadamard_quantize_static(x, had_k, x_scale, 4)
        else:
            xq = ops.quantize_static(x, x_scale, 4)
        return ops.int_linear(xq, x_scale, wq, w_scale, None, 4, 4, x.dtype)

    def x_of(m):
        return torch.randn(m, k, generator=gen).to(device)

    rows = torch.export.Dim("rows", min=1, max=4096)
    packaged = through_aoti(layer, (x_of(2), x_scale, wq, w_scale), tmp_path / "layer.pt2",
                            dynamic_shapes=(({0: rows}, None, None, None),))  # fmt: skip
    for m in (1, 15, 2048):
        x = x_of(m)
        torch.testing.assert_close(packaged(x, x_scale, wq, w_scale), layer(x, x_scale, wq, w_scale), rtol=1e-5,
                                   atol=1e-5, msg=lambda e: f"{m} rows: {e}")  # fmt: skip
