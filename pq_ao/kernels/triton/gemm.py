"""Integer linear `y = (sum_k xq[m,k] * wq[n,k]) * x_scale[m] * w_scale[n] + bias[n]` on int8 tensor cores.

Operands: int8 [R, K] or packed int4 (uint8 [R, K // 2], element 2i in the low nibble). Hopper has no int4 tensor
cores, so 4-bit operands are unpacked in registers to int8 with one bitwise op per value (the "x16" form, see
`_common.py`) and fed to int8 `tl.dot` (wgmma on sm_90 for 64+ rows, mma.sync for 16-row tiles) with exact int32
accumulation. The epilogue shifts the x16 / x256 factor back out (exact), converts to fp32, multiplies by the
activation scale (per-tensor [1] or per-token [M, 1]) and the weight scale [N], adds the bias, and casts.

W4A4 splits each packed byte into its low-nibble and high-nibble halves and issues two dots of K/2 each (the sum over
k does not care in which order the k's come, as long as both operands use the same one), so no interleaving shuffle
is needed. With one packed operand, the unpacked nibbles are interleaved back into natural k order (join + reshape).

Skinny M (decode) uses the same kernel with 16-row tiles, narrow N tiles and optional split-K: the K-partial int32
sums are added with atomics into a zeroed workspace (exact and order-independent), and the last program to finish an
output tile (an atomic ticket counter) runs the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import cast_out, interpreting, unpack_int4_x16


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # in K elements (a packed operand moves block_k // 2 bytes per row per step)
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1
    split_nibbles: bool = True  # W4A4 only: two half-K dots instead of interleaving

    def as_kwargs(self) -> dict:
        return dict(
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
            SPLIT_K=self.split_k, SPLIT_NIBBLES=self.split_nibbles,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )


@triton.jit
def _interleave_k(lo, hi, K_AXIS: tl.constexpr):
    """Interleave (lo, hi) along the K axis: result[2i] = lo[i], result[2i+1] = hi[i]."""
    if K_AXIS == 1:  # [R, KH] -> [R, 2 * KH]
        return tl.reshape(tl.join(lo, hi), (lo.shape[0], 2 * lo.shape[1]))
    else:  # [KH, C] -> [2 * KH, C]
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * lo.shape[0], lo.shape[1]))


@triton.jit
def _int_linear_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_xs,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TOKEN: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share each column sweep (L2 reuse of W)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/cols wrap to valid ones (their results are masked at the store): no load masks on M, N
    rows_a = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)

    KA: tl.constexpr = BLOCK_K // 2 if A_BITS == 4 else BLOCK_K  # bytes of A per row per step
    KW: tl.constexpr = BLOCK_K // 2 if W_BITS == 4 else BLOCK_K
    KA_TOTAL = K // 2 if A_BITS == 4 else K
    KW_TOTAL = K // 2 if W_BITS == 4 else K
    offs_ka = tl.arange(0, KA)
    offs_kw = tl.arange(0, KW)
    a_base = x_ptr + rows_a[:, None] * stride_xm + offs_ka[None, :]
    w_base = w_ptr + rows_w[None, :] * stride_wn + offs_kw[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        ka0 = k0 // 2 if A_BITS == 4 else k0
        kw0 = k0 // 2 if W_BITS == 4 else k0
        if EVEN_K:
            a = tl.load(a_base + ka0)
            w = tl.load(w_base + kw0)
        else:
            a = tl.load(a_base + ka0, mask=offs_ka[None, :] < KA_TOTAL - ka0, other=0)
            w = tl.load(w_base + kw0, mask=offs_kw[:, None] < KW_TOTAL - kw0, other=0)
        if A_BITS == 4 and W_BITS == 4 and SPLIT_NIBBLES:
            a_lo, a_hi = unpack_int4_x16(a)
            w_lo, w_hi = unpack_int4_x16(w)
            acc = tl.dot(a_lo, w_lo, acc)
            acc = tl.dot(a_hi, w_hi, acc)
        else:
            if A_BITS == 4:
                a_lo, a_hi = unpack_int4_x16(a)
                a_op = _interleave_k(a_lo, a_hi, 1)
            else:
                a_op = a
            if W_BITS == 4:
                w_lo, w_hi = unpack_int4_x16(w)
                w_op = _interleave_k(w_lo, w_hi, 0)
            else:
                w_op = w
            acc = tl.dot(a_op, w_op, acc)

    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # exact int32 partial sums; the last program of this tile to arrive does the epilogue
        acc_ptrs = ws_acc_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(acc_ptrs, acc, mask=out_mask, sem="relaxed")
        ticket = tl.atomic_add(ws_cnt_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.load(acc_ptrs, mask=out_mask, other=0, cache_modifier=".cg")
            _epilogue(acc, offs_m, offs_n, out_mask, xs_ptr, ws_ptr, b_ptr, out_ptr, stride_om, stride_xs, M, N,
                      A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, INTERP)
    else:
        _epilogue(acc, offs_m, offs_n, out_mask, xs_ptr, ws_ptr, b_ptr, out_ptr, stride_om, stride_xs, M, N,
                  A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, INTERP)


@triton.jit
def _epilogue(acc, offs_m, offs_n, out_mask, xs_ptr, ws_ptr, b_ptr, out_ptr, stride_om, stride_xs, M, N,
              A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TOKEN: tl.constexpr,
              INTERP: tl.constexpr):
    SHIFT: tl.constexpr = (4 if A_BITS == 4 else 0) + (4 if W_BITS == 4 else 0)
    if SHIFT > 0:
        acc = acc >> SHIFT  # exact: the x16 unpacking made every term a multiple of 2**SHIFT
    y = acc.to(tl.float32)
    if PER_TOKEN:
        xs = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xs, mask=offs_m < M, other=0.0)
        y = y * xs[:, None]
    else:
        y = y * tl.load(xs_ptr)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = y * ws[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = y + b[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, cast_out(y, out_ptr.dtype.element_ty, INTERP), mask=out_mask)


# ------------------------------------------------------------------------------------------------------------------
# Configurations. Picked from the H100 sweep recorded in docs/kernels.md (benchmarks/gpu/tune_linear.py).

_NUM_SMS_H100 = 132


def _skinny_config(M: int, N: int, K: int, a_bits: int, w_bits: int) -> GemmConfig:
    block_n = 64
    block_k = 512 if w_bits == 4 else 256
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, 16)
    k_steps = triton.cdiv(K, block_k)
    split = 1
    while tiles * split < 2 * _NUM_SMS_H100 and split * 2 <= k_steps // 4:
        split *= 2
    return GemmConfig(16, block_n, block_k, num_warps=4, num_stages=4, group_m=1, split_k=split)


def pick_config(M: int, N: int, K: int, a_bits: int, w_bits: int) -> GemmConfig:
    if M <= 16:
        return _skinny_config(M, N, K, a_bits, w_bits)
    if M <= 64:
        return GemmConfig(64, 128, 256, num_warps=4, num_stages=4, group_m=8)
    if M <= 256:
        return GemmConfig(128, 128, 256, num_warps=8, num_stages=4, group_m=8)
    return GemmConfig(128, 256, 128, num_warps=8, num_stages=4, group_m=8)


# ------------------------------------------------------------------------------------------------------------------


def _check_operands(xq, x_scale, wq, w_scale, a_bits, w_bits):
    if a_bits not in (4, 8) or w_bits not in (4, 8):
        raise ValueError(f"a_bits and w_bits must be 4 or 8, got {a_bits}, {w_bits}")
    if x_scale.dim() == 0 or w_scale.dim() == 0:
        raise ValueError("scales must not be 0-d tensors (shape [1], [M, 1] or [N]); AOTInductor rejects 0-d args")
    want_a = torch.uint8 if a_bits == 4 else torch.int8
    want_w = torch.uint8 if w_bits == 4 else torch.int8
    if xq.dtype != want_a or wq.dtype != want_w:
        raise TypeError(f"expected xq {want_a} and wq {want_w} for a_bits={a_bits}, w_bits={w_bits}; "
                        f"got {xq.dtype}, {wq.dtype}")


def int_linear_with_config(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype, cfg: GemmConfig | None):
    _check_operands(xq, x_scale, wq, w_scale, a_bits, w_bits)
    K = wq.shape[-1] * (2 if w_bits == 4 else 1)
    ka = xq.shape[-1] * (2 if a_bits == 4 else 1)
    if ka != K:
        raise ValueError(f"K mismatch: activations have K={ka}, weights K={K}")
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w2 = wq if wq.stride(-1) == 1 else wq.contiguous()
    M, N = x2.shape[0], w2.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0:
        return out.reshape(*lead, N)
    per_token = x_scale.numel() != 1
    if per_token:
        xs = x_scale.reshape(-1)
        if xs.numel() != M:
            raise ValueError(f"x_scale must have 1 or M={M} elements, got {x_scale.numel()}")
    else:
        xs = x_scale.reshape(1)
    if xs.dtype != torch.float32:
        xs = xs.float()
    ws = w_scale.reshape(-1)
    if ws.dtype != torch.float32:
        ws = ws.float()
    if cfg is None:
        cfg = pick_config(M, N, K, a_bits, w_bits)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    if split > 1:
        workspace = torch.zeros((M * N + tiles,), dtype=torch.int32, device=xq.device)
        ws_acc, ws_cnt = workspace[: M * N], workspace[M * N:]
    else:
        ws_acc = ws_cnt = out  # unused
    kw = cfg.as_kwargs()
    kw["SPLIT_K"] = split
    has_bias = bias is not None
    torch.library.wrap_triton(_int_linear_kernel)[(tiles, split)](
        x2, w2, xs, ws, bias if has_bias else ws, out, ws_acc, ws_cnt,
        M, N, K, k_per_split,
        x2.stride(0), w2.stride(0), out.stride(0), 1,
        A_BITS=a_bits, W_BITS=w_bits, HAS_BIAS=has_bias, PER_TOKEN=per_token,
        EVEN_K=(K % cfg.block_k == 0), INTERP=interpreting(), **kw,
    )
    return out.reshape(*lead, N)


def int_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`acc = xq @ wq.T` exactly (int32), `y = acc.float() * x_scale * w_scale (+ bias)`, cast to `out_dtype`.

    xq: [..., K] int8 (a_bits=8) or [..., K // 2] packed uint8 (a_bits=4); x_scale: [1] or [M, 1] fp32.
    wq: [N, K] int8 (w_bits=8) or [N, K // 2] packed uint8 (w_bits=4); w_scale: [N] fp32; bias: [N] or None.
    """
    return int_linear_with_config(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype, None)
