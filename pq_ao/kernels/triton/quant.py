"""Activation quantization kernels: static per-tensor (`quantize_static`) and dynamic per-token (`quantize_dynamic`).

Both are memory-bound: one read of the bf16/fp16/fp32 input, one write of int8 or packed int4. Static quantization
needs no reduction, so each program handles an independent [BLOCK_M, BLOCK_K] tile; dynamic quantization reads each
row twice (absmax, then quantize; the second read mostly hits L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pq_ao import quant_math
from pq_ao.kernels.reference import check_scale

from ._common import next_pow2, pack_int4, qrange, quantize_values


@triton.jit
def _quantize_static_kernel(
    x_ptr, scale_ptr, out_ptr, M, K, stride_xm, stride_om,
    BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, E4M3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """E4M3: one float8 e4m3 code per value (4-bit grid values are exact in e4m3) instead of packed / int8."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = offs_m.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    q = quantize_values(x, scale, QMIN, QMAX)
    if E4M3:
        tl.store(out_ptr + rows * stride_om + offs_k[None, :], q.to(tl.float32).to(tl.float8e4nv), mask=mask)
    elif BITS == 4:
        offs_p = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pmask = (offs_m[:, None] < M) & (offs_p[None, :] < K // 2)
        tl.store(out_ptr + rows * stride_om + offs_p[None, :], pack_int4(q), mask=pmask)
    else:
        tl.store(out_ptr + rows * stride_om + offs_k[None, :], q.to(tl.int8), mask=mask)


def _rows_and_output(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as unit-stride rows [M, K], and the empty quantized output: packed uint8 [M, K // 2] or int8 [M, K]."""
    K = x.shape[-1]
    if bits == 4 and K % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {K}")
    x2 = _rows(x)
    M = x2.shape[0]
    if bits == 4:
        return x2, torch.empty((M, K // 2), dtype=torch.uint8, device=x.device)
    return x2, torch.empty((M, K), dtype=torch.int8, device=x.device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _static_blocks(K: int, bits: int) -> tuple[int, int]:
    block_k = max(16, min(next_pow2(K), 1024))
    block_m = max(1, 4096 // block_k)
    return block_m, block_k


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-tensor quantization. x [..., K] float; scale [1] fp32.

    Returns int8 [..., K] (bits=8) or packed int4 uint8 [..., K // 2] (bits=4)."""
    check_scale(scale, "scale", ((1,),))
    x2, out = _rows_and_output(x, bits)
    _launch_static(x2, scale, out, bits, e4m3=False)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_static_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor 4-bit quantization to one float8 e4m3 code per value: x [..., K] float, scale [1] fp32 ->
    float8_e4m3fn [..., K] holding the values -8..7 of `quantize_static(x, scale, 4)` (exact in e4m3)."""
    check_scale(scale, "scale", ((1,),))
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    _launch_static(x2, scale, out, 4, e4m3=True)
    return out.reshape(x.shape)


def _launch_static(x2: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, bits: int, e4m3: bool) -> None:
    qmin, qmax = qrange(bits)
    M, K = x2.shape
    block_m, block_k = _static_blocks(K, bits)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    torch.library.wrap_triton(_quantize_static_kernel)[grid](
        x2, scale, out, M, K, x2.stride(0), out.stride(0),
        BITS=bits, QMIN=qmin, QMAX=qmax, E4M3=e4m3, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )


# ------------------------------------------------------------------------------------------------------------------
# Dynamic per-token quantization (QuaRot-style baseline): s = quant_math.per_token_scale(x, bits), per row



@triton.jit
def _quantize_dynamic_kernel(
    x_ptr, out_ptr, scale_ptr, clip_ptr, M, K, stride_xm, stride_om,
    BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    rows = offs_m.to(tl.int64)[:, None]
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mmask[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # s = 2 * max(clip * absmax, eps) / (2**b - 1): the min-max grid of docs/architecture.md, per row
    if HAS_CLIP:
        amax = amax * tl.load(clip_ptr)
    scale = tl.math.div_rn(tl.maximum(amax, EPS) * 2.0, QMAX - QMIN + 0.0)
    tl.store(scale_ptr + offs_m, scale, mask=mmask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mmask[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = quantize_values(x, scale[:, None], QMIN, QMAX)
        if BITS == 4:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            pmask = mmask[:, None] & (offs_p[None, :] < K // 2)
            tl.store(out_ptr + rows * stride_om + offs_p[None, :], pack_int4(q), mask=pmask)
        else:
            tl.store(out_ptr + rows * stride_om + offs_k[None, :], q.to(tl.int8), mask=mask)


def quantize_dynamic(
    x: torch.Tensor, bits: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization. x [..., K] float -> (q, scale [..., 1] fp32), q as in `quantize_static`;
    clip: fp32 [1], a factor on each token's absmax (default 1)."""
    qmin, qmax = qrange(bits)
    x2, out = _rows_and_output(x, bits)
    M, K = x2.shape
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    # the whole row in one block up to K = 16384 (one load per pass: no serial latency chain at small M)
    block_k = max(16, min(next_pow2(K), 16384))
    block_m = max(1, min(4, 4096 // block_k))
    warps = 8 if block_k >= 8192 else 4
    grid = (triton.cdiv(M, block_m),)
    if clip is not None:
        check_scale(clip, "clip", ((1,),))
    torch.library.wrap_triton(_quantize_dynamic_kernel)[grid](
        x2, out, scale, clip if clip is not None else scale, M, K, x2.stride(0), out.stride(0),
        BITS=bits, QMIN=qmin, QMAX=qmax, EPS=quant_math.ABSMAX_EPS, HAS_CLIP=clip is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
    return out.reshape(*x.shape[:-1], out.shape[-1]), scale.reshape(*x.shape[:-1], 1)
