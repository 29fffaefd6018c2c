"""W4A4 on Hopper's fp8 tensor cores: `(codes @ w.T) * x_scale * w_scale + bias`, the integer product exact.

Hopper has no int4 tensor cores, and its int8 ones run well below its fp8 ones (H200: cuBLAS `_int_mm` ~920
TOP/s, `_scaled_mm` ~1230 TFLOP/s; our int4-unpacking Triton GEMM ~1.0-1.15x bf16). Every 4-bit code (-8..7) is
exact in float8 e4m3, each product is at most 64, and the sums are integers below 2**24 for K < 262144, which fp32
holds exactly: so an fp8 GEMM of the codes gives bitwise the integers of the reference.

- The activations come as one e4m3 code per value, written by the static quantizer (`quantize_static_e4m3`, or the
  Hadamard fused with it): one byte per value, read once by the GEMM.
- The weights stay packed int4 in memory (`IntxLinearWeight.qdata`, unchanged). Each call widens them to e4m3
  `[N, K]` in one memory-bound pass (`widen_int4_e4m3`: read K/2, write K bytes per row, a transient buffer) and
  hands both to `torch._scaled_mm` (cuBLAS / CUTLASS rowwise fp8) with the activation scale per row and the weight
  scale per column; the bias is added in its epilogue.
- The widening costs about 4 bytes moved per weight byte stored at ~4 TB/s; it pays from a few hundred rows on
  (`FP8_MIN_M`, measured), so decode keeps the int4 GEMV, which reads the packed weights directly.

Epilogue: `_scaled_mm` scales and adds in fp32 in its own order; the result can differ from the reference's
`((acc * x_scale) * w_scale) + bias` by one rounding of the output dtype (the same allowance as the Triton GEMM's FMA
contraction; docs/kernels.md). The integer accumulator itself is exact (tests check it with unit scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# From this many rows on, widen-then-fp8 beats the int4-unpacking Triton GEMM (measured on the H200; see
# benchmarks/RESULTS.md, "Linear kernels"). A symbolic row count (a prefill program exported with a dynamic
# sequence length) takes the fp8 path too.
FP8_MIN_M = 512


@triton.jit
def _widen_int4_e4m3_kernel(w_ptr, out_ptr, NBYTES, BLOCK: tl.constexpr):
    """Flat packed bytes [NBYTES] -> flat e4m3 codes [2 * NBYTES]: byte i holds element 2i (low nibble) and 2i + 1."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(w_ptr + offs, mask=offs < NBYTES, other=0)
    lo = (p << 4).to(tl.int8, bitcast=True) >> 4  # sign-extended low nibble
    hi = p.to(tl.int8, bitcast=True) >> 4
    v = tl.reshape(tl.join(lo, hi), (2 * BLOCK,))
    offs2 = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs2, v.to(tl.float32).to(tl.float8e4nv), mask=offs2 < 2 * NBYTES)


def widen_int4_e4m3(wq: torch.Tensor) -> torch.Tensor:
    """Packed int4 uint8 `[N, K // 2]` -> float8_e4m3fn `[N, K]` of the same values (exact)."""
    if wq.dtype != torch.uint8 or wq.dim() != 2:
        raise ValueError(f"wq must be packed int4, uint8 [N, K // 2], got {wq.dtype} {list(wq.shape)}")
    w = wq.contiguous()
    n, kb = w.shape
    out = torch.empty((n, 2 * kb), dtype=torch.float8_e4m3fn, device=w.device)
    block = 2048
    torch.library.wrap_triton(_widen_int4_e4m3_kernel)[(triton.cdiv(n * kb, block),)](
        w, out, n * kb, BLOCK=block, num_warps=4,
    )
    return out


def usable(n: int, k: int, a_bits: int, w_bits: int, out_dtype: torch.dtype, bias: torch.Tensor | None) -> bool:
    """Whether the fp8 path computes this linear: W4A4, a bf16 output (what `_scaled_mm`'s rowwise scaling
    writes; a bias must be bf16 too), and N, K multiples of 16 (its alignment)."""
    return ((a_bits, w_bits) == (4, 4) and out_dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0
            and (bias is None or bias.dtype == torch.bfloat16))  # fmt: skip


def e4m3_int4_linear(codes: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """codes float8_e4m3fn `[..., K]` (4-bit values), x_scale fp32 `[1]`, wq packed uint8 `[N, K // 2]`, w_scale
    fp32 `[N]`, bias `[N]` bf16 or None -> `[..., N]` out_dtype (bf16). See the module docstring."""
    k = codes.shape[-1]
    n = wq.shape[0]
    if codes.dtype != torch.float8_e4m3fn or wq.shape[1] * 2 != k:
        raise ValueError(f"codes must be float8_e4m3fn [..., K] and wq uint8 [N, K // 2]; got {codes.dtype} "
                         f"{list(codes.shape)}, {wq.dtype} {list(wq.shape)}")
    if not usable(n, k, 4, 4, out_dtype, bias):
        raise ValueError(f"the fp8 path needs a bf16 output (and bias), N and K multiples of 16: N={n}, K={k}, "
                         f"{out_dtype}, bias {None if bias is None else bias.dtype}")
    a = codes.reshape(-1, k)
    m = a.shape[0]
    w8 = widen_int4_e4m3(wq)
    scale_a = x_scale.reshape(1, 1).float().expand(m, 1).contiguous()
    scale_b = w_scale.reshape(1, n).float()
    y = torch._scaled_mm(a, w8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    return y.reshape(*codes.shape[:-1], n)
