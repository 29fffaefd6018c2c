"""Online Hadamard transform of size n = KH * 2**m, alone or fused with static quantization.

Contract (docs/architecture.md): H_n = had_k (kron) H_{2^m} (Sylvester), scaled by 1/sqrt(n). For a row viewed as
[KH, 2^m]: Walsh-Hadamard over the last dim, then `had_k @ X` over the KH dim.

Kernel: write 2^m = P1 * C with C = min(2^m, 128) and view a row as X [A, C], A = KH * P1. Since
H_{2^m} = H_{P1} (kron) H_C, the whole transform is Y = M_A @ X @ H_C with M_A = had_k (kron) H_{P1}: two tensor-core
matmuls per row, no butterflies and no permutes. Both matrices are built in registers (Sylvester entries are
(-1)**popcount(i & j); had_k is gathered from its [KH, KH] tensor), so nothing is precomputed on the host.
Rows with A > 1 run in a persistent loop (`ROW_LOOP`): each program builds M_A once, then walks its rows in steps of
BC columns, Y = sum_b (M_A @ X[:, b]) @ H_C[b, :], with the next step's loads issued before the current step's dots.
Few rows (decode) split each row's transform by blocks of M_A's rows (`_a_blocks`): M = 1 at n = 14336 runs on 8
programs instead of one.
The whole-row form (X @ H_C, then M_A @ Z, both [128, 128] in registers) held 255 registers and 128 KiB of shared
memory, one program per multiprocessor with its loads exposed: down_proj's transform (M = 2048, n = 14336) took
~204 us on an H100 (2026-12-07 prefill profile) against ~35 us of traffic.

Precision: every product runs on bf16 tensor cores with fp32 accumulation. Operands exact in bf16 (bf16 input, the
+-1 Sylvester entries, had_k when K has a known +-1 construction: `pq_ao.hadamard.has_true_hadamard(K)`) go in as
they are; the others (fp16/fp32 input, the orthogonal fallback factors, the fp32 intermediate between the two
products) are split into bf16 hi + lo parts (about 2**-17 relative error, near fp32). 1/sqrt(n) is applied in fp32
at the end. A row of more than 128 x 128 elements
(n > 16384 for powers of two) or a power-of-2 part under 16 goes to a plain-torch fallback.

Fused quantization (`hadamard_quantize_static`) quantizes the fp32 accumulator directly, as
rint(acc * (1/sqrt(n) / scale)): one multiply per value instead of the reference's correctly rounded division of
the transform (`pq_ao.kernels.reference.hadamard_quantize_static`), which it matches up to a flip at a rounding
boundary, as the summation order already allows; e4m3 codes are converted from the fp32 integers directly. Gated
(a gated MLP's down_proj): the input rows are joined [gate | up] projections and the kernel transforms
`silu(gate) * up`, computed in its loads with eager torch's roundings (`reference.swiglu`), so the product is never
written out.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pq_ao import hadamard as _had
from pq_ao.kernels import reference

from ._common import NUM_SMS, cast_out, interpreting, next_pow2, pack_int4, qrange, round_clamp
from .quant import quantize_static, quantize_static_e4m3

MAX_C = 128

MAX_A = 128
# The row loop (A > 1): programs per multiprocessor, warps (rows of 8192+ padded elements) and columns of X per step.
ROW_LOOP = dict(programs_per_sm=2, warps=8, block_c=64)



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
def _mm(a_bf16, b_bf16, acc, INTERP: tl.constexpr):
    """acc + bf16 @ bf16, accumulated in fp32 on the tensor cores. The CPU interpreter's bf16 dot is wrong (it
    multiplies raw bits), so there the same bf16 values are multiplied in fp32 (exact products; only the summation
    order differs)."""
    if INTERP:
        return tl.dot(a_bf16.to(tl.float32), b_bf16.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a_bf16, b_bf16, acc)


@triton.jit
def _split_bf16(v):
    v32 = v.to(tl.float32)
    hi = v32.to(tl.bfloat16)
    lo = (v32 - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _dot_split(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b (fp32 or bf16 values) on bf16 tensor cores, every partial product accumulated into acc (fp32). An
    operand whose values are exact in bf16 is used as is; the other is split into bf16 hi + lo (about 2**-17
    relative): 1, 2 or 3 dots (the lo @ lo term is below fp32 resolution)."""
    if A_EXACT and B_EXACT:
        return _mm(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, INTERP)
    elif A_EXACT:
        a16 = a.to(tl.bfloat16)
        b_hi, b_lo = _split_bf16(b)
        return _mm(a16, b_lo, _mm(a16, b_hi, acc, INTERP), INTERP)
    elif B_EXACT:
        b16 = b.to(tl.bfloat16)
        a_hi, a_lo = _split_bf16(a)
        return _mm(a_lo, b16, _mm(a_hi, b16, acc, INTERP), INTERP)
    else:
        a_hi, a_lo = _split_bf16(a)
        b_hi, b_lo = _split_bf16(b)
        return _mm(a_lo, b_hi, _mm(a_hi, b_lo, _mm(a_hi, b_hi, acc, INTERP), INTERP), INTERP)


@triton.jit
def _quantize_store(acc, inv_sqrt_n, out_base, offs_c, mask, scale_ptr, out_ptr, QUANT: tl.constexpr,
                    BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, E4M3: tl.constexpr,
                    INTERP: tl.constexpr):
    """Store the transform `acc * inv_sqrt_n` (inv_sqrt_n an fp32 scalar): quantized (packed int4 / int8 / one e4m3
    code per value) as rint(acc * (inv_sqrt_n / scale)), or cast to the output dtype."""
    C: tl.constexpr = offs_c.shape[0]
    if QUANT:
        q = round_clamp(acc * tl.math.div_rn(inv_sqrt_n, tl.load(scale_ptr)), QMIN, QMAX)
        if E4M3:
            tl.store(out_base + offs_c[None, :], q.to(tl.float8e4nv), mask=mask)  # integers -8..7: exact
        elif BITS == 4:
            tl.store(out_base + tl.arange(0, C // 2)[None, :], pack_int4(q.to(tl.int32)), mask=mask)
        else:
            tl.store(out_base + offs_c[None, :], q.to(tl.int8), mask=mask)
    else:
        tl.store(out_base + offs_c[None, :], cast_out(acc * inv_sqrt_n, out_ptr.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _load_raw(ptrs, mask, half, GATED: tl.constexpr):
    """The raw input at ptrs: (gate, up) of joined [gate | up] rows, up `half` elements after gate (GATED), else
    (x, x)."""
    g = tl.load(ptrs, mask=mask, other=0.0)
    if GATED:
        return g, tl.load(ptrs + half, mask=mask, other=0.0)
    else:
        return g, g


@triton.jit
def _gate(g, u, GATED: tl.constexpr, INTERP: tl.constexpr):
    """The transform's input from `_load_raw`'s pair: `silu(gate) * up` rounded to the input dtype after each op as
    eager torch rounds (`reference.swiglu`) when GATED, else x itself."""
    if GATED:
        g32 = g.to(tl.float32)
        act = cast_out(g32 / (1.0 + tl.exp(-g32)), g.dtype, INTERP)
        return cast_out(act.to(tl.float32) * u.to(tl.float32), g.dtype, INTERP)
    else:
        return g


@triton.jit
def _hadamard_kernel(
    x_ptr, hk_ptr, scale_ptr, out_ptr, M, stride_xm, stride_om, inv_sqrt_n, half,
    KH: tl.constexpr, HAS_HK: tl.constexpr, HK_EXACT: tl.constexpr, P1: tl.constexpr, A: tl.constexpr, A_PAD: tl.constexpr,
    C: tl.constexpr, ROWS: tl.constexpr, RA: tl.constexpr, BC: tl.constexpr, X_BF16: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, E4M3: tl.constexpr,
    GATED: tl.constexpr, INTERP: tl.constexpr,
):
    """GATED: x_ptr holds joined [gate | up] rows (stride_xm apart, up `half` elements after gate) and the transform
    is of `silu(gate) * up` (`_gate`)."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, C)
    inv_n = (tl.zeros((), tl.float32) + inv_sqrt_n).to(tl.float32)  # an fp64 argument under inductor, fp32 eager
    if A == 1:
        # ROWS rows of C elements per program: Y = X @ H_C
        h_c = _sylvester(offs_c[:, None], offs_c[None, :]).to(tl.bfloat16)
        offs_r = pid * ROWS + tl.arange(0, ROWS)
        rmask = offs_r[:, None] < M
        rows = offs_r.to(tl.int64)[:, None]
        g, u = _load_raw(x_ptr + rows * stride_xm + offs_c[None, :], rmask, half, GATED)
        x = _gate(g, u, GATED, INTERP)
        y = _dot_split(x, h_c, tl.zeros((ROWS, C), dtype=tl.float32), X_BF16, True, INTERP)
        _quantize_store(y, inv_n, out_ptr + rows * stride_om, offs_c, rmask, scale_ptr, out_ptr,
                        QUANT, BITS, QMIN, QMAX, E4M3, INTERP)
    else:
        # A row viewed as X [A, C]: Y = (M_A @ X) @ H_C with M_A = had_k (kron) H_P1. The work is split in units
        # (row, a-block): a-block `ab` computes Y's rows ab * RA .. ab * RA + RA - 1 from all of X (NA = A_PAD / RA
        # blocks; NA > 1 spreads a few rows over many programs, decode). Programs walk units pid, pid + programs,
        # ...; `programs` is a multiple of NA, so a program's a-block is fixed and its M_A rows are built once.
        # Each unit accumulates over column chunks of BC: Y = sum_b (M_A @ X[:, b]) @ H_C[b, :], in one loop over
        # (unit, chunk) steps; each step issues the next step's loads before its own dots (a register double
        # buffer: the pipeliner does not buffer loads that feed elementwise code).
        NA: tl.constexpr = A_PAD // RA
        offs_a = tl.arange(0, A_PAD)
        amask = offs_a[:, None] < A
        offs_ra = (pid % NA) * RA + tl.arange(0, RA)
        ramask = offs_ra[:, None] < A
        i = offs_ra[:, None]
        j = offs_a[None, :]
        m_a = _sylvester(i % P1, j % P1)
        if HAS_HK:
            hk = tl.load(hk_ptr + (i // P1) * KH + (j // P1), mask=(i < A) & (j < A), other=0.0).to(tl.float32)
            m_a = m_a * hk
        m_a = tl.where((i < A) & (j < A), m_a, 0.0)
        if HK_EXACT:
            m_a = m_a.to(tl.bfloat16)  # +-1 and 0: exact, and half the registers across the loop
        OUT_C: tl.constexpr = C // 2 if QUANT and BITS == 4 and not E4M3 else C
        NB: tl.constexpr = C // BC
        programs = tl.num_programs(0)
        steps = tl.cdiv(M * NA - pid, programs) * NB  # <= 0 for a program past the units (a symbolic M's grid)
        offs_x = offs_a[:, None] * C + tl.arange(0, BC)[None, :]
        row0 = tl.maximum(tl.minimum(pid // NA, M - 1), 0)  # a row in bounds even when this program has none
        g, u = _load_raw(x_ptr + row0.to(tl.int64) * stride_xm + offs_x, offs_a[:, None] < A * tl.minimum(M, 1), half,
                         GATED)  # nothing read for M = 0
        acc = tl.zeros((RA, C), dtype=tl.float32)
        for step in range(0, steps):
            t = step + tl.zeros((), tl.int32)  # (a Python int under the interpreter)
            row = (pid + (t // NB) * programs) // NA
            c0 = (t % NB) * BC
            tn = t + 1
            x = _gate(g, u, GATED, INTERP)
            row_n = tl.minimum((pid + (tn // NB) * programs) // NA, M - 1)  # past the last step: in bounds, unused
            g, u = _load_raw(x_ptr + row_n.to(tl.int64) * stride_xm + (tn % NB) * BC + offs_x, amask, half, GATED)
            w = _dot_split(m_a, x, tl.zeros((RA, BC), dtype=tl.float32), HK_EXACT, X_BF16, INTERP)
            offs_b = c0 + tl.arange(0, BC)
            acc = _dot_split(w, _sylvester(offs_b[:, None], offs_c[None, :]).to(tl.bfloat16), acc, False, True, INTERP)
            if c0 == C - BC:
                _quantize_store(acc, inv_n, out_ptr + row.to(tl.int64) * stride_om + offs_ra[:, None] * OUT_C,
                                offs_c, ramask, scale_ptr, out_ptr, QUANT, BITS, QMIN, QMAX, E4M3, INTERP)
                acc = tl.zeros((RA, C), dtype=tl.float32)


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


def _a_blocks(M, a_pad: int) -> int:
    """How many blocks of M_A's rows a row's transform is split into (a power of 2, each of at least 16 rows): enough
    for M rows to occupy every multiprocessor (decode: M = 1 gives A_PAD / 16 programs instead of one), 1 for M of
    a multiprocessor count or more and for a symbolic M (an exported prefill)."""
    if not isinstance(M, int):
        return 1
    want = NUM_SMS // max(M, 1)
    na = 1
    while na * 2 <= min(want, a_pad // 16):
        na *= 2
    return na


def _row_loop_programs(M, na: int = 1) -> int:
    """The row loop's persistent grid (M_A's rows are built once per program, not once per unit): ROW_LOOP's
    programs per multiprocessor rounded down to a multiple of `na` (so each program keeps one a-block), at most the
    M * na units when M is known; a symbolic M (an exported prefill) gets the full grid, and the programs past the
    units find none."""
    programs = ROW_LOOP["programs_per_sm"] * NUM_SMS // na * na
    return min(M * na, programs) if isinstance(M, int) else programs


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
        a_pad = ra = 1
        warps = 4
    else:
        rows = 1
        a_pad = max(16, next_pow2(a))
        na = _a_blocks(M, a_pad)
        grid = (_row_loop_programs(M, na),)
        ra = a_pad // na
        warps = ROW_LOOP["warps"] if a_pad * c >= 8192 else 4  # X [A_PAD, BC] loads dominate at any RA
    has_hk = had_k is not None and kh > 1
    if has_hk and not had_k.is_contiguous():
        had_k = had_k.contiguous()
    torch.library.wrap_triton(_hadamard_kernel)[grid](
        x2, had_k if has_hk else x2, scale if quant else x2, out, M, x2.stride(0), out.stride(0),
        1.0 / math.sqrt(n), n,
        KH=kh, HAS_HK=has_hk, HK_EXACT=(not has_hk) or _had.has_true_hadamard(kh),
        P1=p1, A=a, A_PAD=a_pad, C=c, ROWS=rows, RA=ra, BC=min(c, ROW_LOOP["block_c"]), X_BF16=(x.dtype == torch.bfloat16),
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
