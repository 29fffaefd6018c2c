"""Triton building blocks shared by the pq_ao kernels: the quantization grid and int4 (un)packing.

Numeric contract (docs/architecture.md): `q = clamp(round_half_even(x / s), qmin, qmax)` with the division done in
fp32, correctly rounded (`div_rn`, not Triton's default approximate `/`). Round-half-even is the fp32 magic-number
trick: for |v| < 2**22, `(v + 1.5 * 2**23) - 1.5 * 2**23` is `v` rounded to the nearest integer, ties to even (the
add is IEEE round-to-nearest-even; nothing can fuse it). Clamping first (to integers) and rounding second gives the
same result as rounding then clamping, and keeps |v| small. (libdevice `rint` would do too, but the CPU interpreter
does not run libdevice.)

int4 packing: element 2i in the low nibble, 2i+1 in the high nibble, two's complement, uint8.

Unpacking for the tensor cores uses the "times 16" form, one bitwise op per value:
  `(p << 4)` reinterpreted as int8 is `16 * lo`, and `(p & 0xF0)` as int8 is `16 * hi`,
so an int8 dot of unpacked operands accumulates 16x (one packed operand) or 256x (both) the true sum, exactly, in
int32; the epilogue shifts it back (`acc >> 4` / `acc >> 8`, exact because the sum is a multiple). Overflow bound:
256 * K * 8 * 8 < 2**31 for K < 131072 (W4A4); 16 * K * 8 * 128 < 2**31 for K < 131072 (W4A8).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from pq_ao.quant_math import qrange

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23

# Multiprocessors of the H100 / H200 the grids are planned for: a constant, not a device query, so a trace on fake
# CUDA tensors (no GPU) plans the same grid as the GPU does.
NUM_SMS = 132


@triton.jit
def quantize_values(v, scale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """fp32 values -> int32 grid values: clamp(rint(v / scale), QMIN, QMAX), division correctly rounded."""
    return round_clamp(tl.math.div_rn(v, scale), QMIN, QMAX).to(tl.int32)


@triton.jit
def round_clamp(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """fp32 -> clamp(rint(v), QMIN, QMAX) as fp32 integers (round half to even: the magic-number add)."""
    q = tl.minimum(tl.maximum(v, QMIN), QMAX)
    return (q + 12582912.0) - 12582912.0


@triton.jit
def pack_int4(q):
    """[R, C] int32 in [-8, 7] (C even) -> [R, C // 2] uint8, element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(q, (q.shape[0], q.shape[1] // 2, 2)))
    return ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)


@triton.jit
def unpack_int4_x16(p, ASM: tl.constexpr):
    """uint8 packed nibbles -> (16 * low, 16 * high) as int8 tensors of the same shape.

    With ASM (GPU), four bytes at a time in one 32-bit register: `(w << 4) & 0xF0F0F0F0` and `w & 0xF0F0F0F0`
    (the shift's carry into the next byte is masked off), about 3 instructions per 8 values instead of a few per
    value for byte-wise ops. The interpreter runs the byte-wise form (same values)."""
    if ASM:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
            "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4,
        )
        hi = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4,
        )
    else:
        lo = (p << 4).to(tl.int8, bitcast=True)
        hi = (p & 0xF0).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum over the 4 bytes of a * b (signed int8 lanes of int32 words): `dp4a.s32.s32` on the GPU."""
    if ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1,
        )
    else:
        s = c
        for i in tl.static_range(4):
            s += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return s


@triton.jit
def cast_out(y, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dtype, round to nearest even. The CPU interpreter truncates fp32 -> bf16, so there the rounding is
    done on the bits first (finite values); on the GPU this is the plain conversion (cvt.rn)."""
    if INTERP and dtype == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return y.to(dtype)


# Whether this module's kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at import time; that is
# what `triton.jit` looks at, so the launchers ask this rather than the environment of the moment).
try:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton without knobs
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def interpreting() -> bool:
    return _INTERPRETED


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


__all__ = ["cast_out", "dp4a", "interpreting", "quantize_values", "round_clamp", "pack_int4", "unpack_int4_x16", "qrange", "next_pow2", "triton"]
