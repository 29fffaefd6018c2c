"""Online Hadamard transform of size n = KH * 2**m, alone or fused with static quantization.

Contract (docs/architecture.md): H_n = had_k (kron) H_{2^m} (Sylvester), scaled by 1/sqrt(n). For a row viewed as
[KH, 2^m]: Walsh-Hadamard over the last dim, then `had_k @ X` over the KH dim.

Kernel: write 2^m = P1 * C with C = min(2^m, 128) and view a row as X [A, C], A = KH * P1. Since
H_{2^m} = H_{P1} (kron) H_C, the whole transform is Y = M_A @ X @ H_C with M_A = had_k (kron) H_{P1}: two tensor-core
matmuls per row, no butterflies and no permutes. Both matrices are built in registers (Sylvester entries are
(-1)**popcount(i & j); had_k is gathered from its [KH, KH] tensor), so nothing is precomputed on the host.
Rows with A > 1 run in a persistent loop (`PROGRAMS_PER_SM` programs per multiprocessor, each building M_A and
H_C once for all its rows; loads not multi-buffered, which asked for 256 KiB of shared memory). It ran end to end on
an H100 (2026-12-07); its speed against one program per row is not measured yet (`bench_kernels.py
--programs-per-sm 2,1,4,0` compares them and checks they write the same bytes).

Precision: X @ H_C runs on bf16 operands; for bf16 input the products are exact (+-1 entries) and accumulate in fp32.
The fp32 intermediate is split into bf16 hi + lo parts for M_A @ Z (about 2**-17 relative error, near fp32), which
takes had_k's entries as exact in bf16 when K has a known +-1 construction (`pq_ao.hadamard.has_true_hadamard(K)`;
1/sqrt(n) is applied in fp32 at the end); for the orthogonal fallback factors had_k is split too (3 dots).
fp16/fp32 inputs are split the same way for the first product. A row of more than 128 x 128 elements
(n > 16384 for powers of two) or a power-of-2 part under 16 goes to a plain-torch fallback.

Fused quantization (`hadamard_quantize_static`) quantizes the fp32 transform directly, as the reference does
(`pq_ao.kernels.reference.hadamard_quantize_static`; no rounding to the input dtype in between). Gated (a gated
MLP's down_proj): the input rows are joined [gate | up] projections and the kernel transforms `silu(gate) * up`,
computed in its loads with eager torch's roundings (`reference.swiglu`), so the product is never written out.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pq_ao import hadamard as _had
from pq_ao.kernels import reference

from ._common import NUM_SMS, cast_out, interpreting, next_pow2, pack_int4, qrange, quantize_values
from .quant import quantize_static, quantize_static_e4m3

MAX_C = 128

MAX_A = 128
# the row loop's programs per multiprocessor (A > 1)
PROGRAMS_PER_SM = 2



@triton.jit
def _sylvester(i, j):
    """(-1) ** popcount(i & j) as fp32 (broadcast i [R, 1] against j [1, C])."""
    v = i & j
    v = v ^ (v >> 16)
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def _mm(a_bf16, b_bf16, INTERP: tl.constexpr):
    """bf16 @ bf16 with fp32 accumulation. The CPU interpreter's bf16 dot is wrong (it multiplies raw bits), so
    there the same bf16 values are multiplied in fp32 (exact products; only the summation order differs)."""
    if INTERP:
        return tl.dot(a_bf16.to(tl.float32), b_bf16.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a_bf16, b_bf16)


@triton.jit
def _split_bf16(v):
    v32 = v.to(tl.float32)
    hi = v32.to(tl.bfloat16)
    lo = (v32 - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _dot_f32_bf16(a, b_bf16, A_EXACT: tl.constexpr, INTERP: tl.constexpr):
    """a (fp32 or bf16 values) @ b (bf16, exact) with fp32 accumulation; a split into bf16 hi + lo unless exact."""
    if A_EXACT:
        return _mm(a.to(tl.bfloat16), b_bf16, INTERP)
    else:
        hi, lo = _split_bf16(a)
        return _mm(hi, b_bf16, INTERP) + _mm(lo, b_bf16, INTERP)


@triton.jit
def _f32_dot_f32(a, b, A_EXACT: tl.constexpr, INTERP: tl.constexpr):
    """a @ b (both fp32) with fp32 accumulation, b split into bf16 hi + lo; a too unless its values are exact in
    bf16 (then 2 dots, else 3: the lo @ lo term is below fp32 resolution)."""
    b_hi, b_lo = _split_bf16(b)
    if A_EXACT:
        a_bf16 = a.to(tl.bfloat16)
        return _mm(a_bf16, b_hi, INTERP) + _mm(a_bf16, b_lo, INTERP)
    else:
        a_hi, a_lo = _split_bf16(a)
        return _mm(a_hi, b_hi, INTERP) + (_mm(a_hi, b_lo, INTERP) + _mm(a_lo, b_hi, INTERP))


@triton.jit
def _quantize_store(y, out_base, offs_c, mask, scale_ptr, out_ptr, QUANT: tl.constexpr, BITS: tl.constexpr,
                    QMIN: tl.constexpr, QMAX: tl.constexpr, E4M3: tl.constexpr, INTERP: tl.constexpr):
    """Store the fp32 transform y: quantized (packed int4 / int8 / one e4m3 code per value), or cast to the output
    dtype."""
    C: tl.constexpr = offs_c.shape[0]
    if QUANT:
        q = quantize_values(y, tl.load(scale_ptr), QMIN, QMAX)
        if E4M3:
            tl.store(out_base + offs_c[None, :], q.to(tl.float32).to(tl.float8e4nv), mask=mask)
        elif BITS == 4:
            tl.store(out_base + tl.arange(0, C // 2)[None, :], pack_int4(q), mask=mask)
        else:
            tl.store(out_base + offs_c[None, :], q.to(tl.int8), mask=mask)
    else:
        tl.store(out_base + offs_c[None, :], cast_out(y, out_ptr.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _load_input(ptrs, mask, half, GATED: tl.constexpr, INTERP: tl.constexpr):
    """The transform's input: x itself, or (GATED) `silu(gate) * up` of a joined [gate | up] row, up `half`
    elements after gate, rounded to the input dtype after each op as eager torch rounds (`reference.swiglu`)."""
    if GATED:
        g = tl.load(ptrs, mask=mask, other=0.0)
        u = tl.load(ptrs + half, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        act = cast_out(g32 / (1.0 + tl.exp(-g32)), g.dtype, INTERP)
        return cast_out(act.to(tl.float32) * u.to(tl.float32), g.dtype, INTERP)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _hadamard_kernel(
    x_ptr, hk_ptr, scale_ptr, out_ptr, M, stride_xm, stride_om, inv_sqrt_n, half,
    KH: tl.constexpr, HAS_HK: tl.constexpr, HK_EXACT: tl.constexpr, P1: tl.constexpr, A: tl.constexpr, A_PAD: tl.constexpr,
    C: tl.constexpr, ROWS: tl.constexpr, X_BF16: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, E4M3: tl.constexpr,
    GATED: tl.constexpr, INTERP: tl.constexpr,
):
    """GATED: x_ptr holds joined [gate | up] rows (stride_xm apart, up `half` elements after gate) and the transform
    is of `silu(gate) * up` (`_load_input`)."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, C)
    h_c = _sylvester(offs_c[:, None], offs_c[None, :]).to(tl.bfloat16)
    if A == 1:
        # ROWS rows of C elements per program: Y = X @ H_C
        offs_r = pid * ROWS + tl.arange(0, ROWS)
        rmask = offs_r[:, None] < M
        rows = offs_r.to(tl.int64)[:, None]
        x = _load_input(x_ptr + rows * stride_xm + offs_c[None, :], rmask, half, GATED, INTERP)
        y = (_dot_f32_bf16(x, h_c, X_BF16, INTERP) * inv_sqrt_n).to(tl.float32)  # fp64 scalar under inductor
        _quantize_store(y, out_ptr + rows * stride_om, offs_c, rmask, scale_ptr, out_ptr,
                        QUANT, BITS, QMIN, QMAX, E4M3, INTERP)
    else:
        # rows pid, pid + programs, ... viewed as [A, C]: Y = M_A @ (X @ H_C), M_A = had_k (kron) H_P1, built once
        offs_a = tl.arange(0, A_PAD)
        amask = offs_a[:, None] < A
        i = offs_a[:, None]
        j = offs_a[None, :]
        m_a = _sylvester(i % P1, j % P1)
        if HAS_HK:
            hk = tl.load(hk_ptr + (i // P1) * KH + (j // P1), mask=(i < A) & (j < A), other=0.0).to(tl.float32)
            m_a = m_a * hk
        m_a = tl.where((i < A) & (j < A), m_a, 0.0)
        if HK_EXACT:
            m_a = m_a.to(tl.bfloat16)  # +-1 and 0: exact, and half the registers across the loop
        OUT_C: tl.constexpr = C // 2 if QUANT and BITS == 4 and not E4M3 else C
        for r in tl.range(pid, M, tl.num_programs(0), num_stages=1):  # no multi-buffered loads: shared memory
            row = r + tl.zeros((), tl.int64)  # (r is a Python int under the interpreter)
            x = _load_input(x_ptr + row * stride_xm + offs_a[:, None] * C + offs_c[None, :], amask, half, GATED,
                            INTERP)
            z = _dot_f32_bf16(x, h_c, X_BF16, INTERP)
            y = (_f32_dot_f32(m_a, z, HK_EXACT, INTERP) * inv_sqrt_n).to(tl.float32)
            _quantize_store(y, out_ptr + row * stride_om + offs_a[:, None] * OUT_C, offs_c, amask, scale_ptr, out_ptr,
                            QUANT, BITS, QMIN, QMAX, E4M3, INTERP)


def _plan(n: int, had_k: torch.Tensor | None):
    kh = 1 if had_k is None else int(had_k.shape[0])
    if had_k is not None and (had_k.dim() != 2 or had_k.shape[0] != had_k.shape[1]):
        raise ValueError(f"had_k must be a square [K, K] matrix, got {tuple(had_k.shape)}")
    if n % kh:
        raise ValueError(f"size {n} is not a multiple of the had_k size {kh}")
    p = n // kh
    if p & (p - 1):
        raise ValueError(f"size {n} = {kh} * {p}: {p} is not a power of 2")
    c = min(p, MAX_C)
    p1 = p // c
    a = kh * p1
    ok = c >= 16 and a <= MAX_A
    return kh, p1, a, c, ok


def _launch(x, had_k, scale, bits, quant: bool, e4m3: bool = False, gated: bool = False):
    """gated: x is a joined [gate | up] `[..., 2n]` and the transform is of `silu(gate) * up` `[..., n]`."""
    if gated and x.shape[-1] % 2:
        raise ValueError(f"a gated input holds gate and up side by side (an even last dim), got {x.shape[-1]}")
    n = x.shape[-1] // 2 if gated else x.shape[-1]
    kh, p1, a, c, ok = _plan(n, had_k)
    if not ok or x.dtype == torch.float64:
        # sizes the kernel does not tile, and fp64: the plain-torch transform (pq_ao.hadamard)
        if gated:
            x = reference.swiglu(x)
        if not quant:
            return _had.hadamard_transform(x, had_k)
        y = _had.hadamard_transform(x if x.dtype == torch.float64 else x.float(), had_k)
        return quantize_static_e4m3(y, scale) if e4m3 else quantize_static(y, scale, bits)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if quant:
        qmin, qmax = qrange(bits)
        if scale.dim() == 0:
            raise ValueError("scale must have shape [1] (0-d tensors break AOTInductor)")
        if e4m3:
            out = torch.empty((M, n), dtype=torch.float8_e4m3fn, device=x.device)
        elif bits == 4:
            out = torch.empty((M, n // 2), dtype=torch.uint8, device=x.device)
        else:
            out = torch.empty((M, n), dtype=torch.int8, device=x.device)
    else:
        qmin, qmax, bits = 0, 0, 16
        out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if a == 1:
        rows = max(16, 4096 // c)
        grid = (triton.cdiv(M, rows),)
        a_pad = 1
        warps = 4
    else:
        rows = 1
        # a persistent grid: M_A and H_C are built once per program, not once per row
        grid = (min(M, PROGRAMS_PER_SM * NUM_SMS) if isinstance(M, int) else PROGRAMS_PER_SM * NUM_SMS,)
        a_pad = max(16, next_pow2(a))
        warps = 8 if a_pad * c >= 8192 else 4
    has_hk = had_k is not None and kh > 1
    if has_hk and not had_k.is_contiguous():
        had_k = had_k.contiguous()
    torch.library.wrap_triton(_hadamard_kernel)[grid](
        x2, had_k if has_hk else x2, scale if quant else x2, out, M, x2.stride(0), out.stride(0),
        1.0 / math.sqrt(n), n,
        KH=kh, HAS_HK=has_hk, HK_EXACT=(not has_hk) or _had.has_true_hadamard(kh),
        P1=p1, A=a, A_PAD=a_pad, C=c, ROWS=rows, X_BF16=(x.dtype == torch.bfloat16),
        QUANT=quant, BITS=bits, QMIN=qmin, QMAX=qmax, E4M3=e4m3, GATED=gated,
        INTERP=interpreting(), num_warps=warps,
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal Hadamard of size n = x.shape[-1] = K * 2**m over the last dim; had_k [K, K] (+-1) or None."""
    return _launch(x, had_k, None, 16, quant=False)


def hadamard_quantize_static(x: torch.Tensor, had_k: torch.Tensor | None, scale: torch.Tensor, bits: int,
                             gated: bool = False):
    """`quantize_static(hadamard_transform(x, had_k), scale, bits)` in one pass; `gated`: of `reference.swiglu(x)`
    (x a joined [gate | up])."""
    return _launch(x, had_k, scale, bits, quant=True, gated=gated)


def hadamard_quantize_static_e4m3(x: torch.Tensor, had_k: torch.Tensor | None, scale: torch.Tensor,
                                  gated: bool = False) -> torch.Tensor:
    """`hadamard_quantize_static(x, had_k, scale, 4, gated)` as one float8 e4m3 code per value, float8_e4m3fn
    [..., n]."""
    return _launch(x, had_k, scale, 4, quant=True, e4m3=True, gated=gated)
