"""Integer linear `y = (sum_k xq[m,k] * wq[n,k]) * x_scale[m] * w_scale[n] + bias[n]` on int8 tensor cores.

Operands: int8 [R, K] or packed int4 (uint8 [R, K // 2], element 2i in the low nibble). Hopper has no int4 tensor
cores, so 4-bit operands are unpacked in registers to int8 with one bitwise op per value (the "x16" form, see
`_common.py`) and fed to int8 `tl.dot` (wgmma on sm_90 for 64+ rows, mma.sync for 16-row tiles) with exact int32
accumulation. The epilogue shifts the x16 / x256 factor back out (exact), converts to fp32, multiplies by the
activation scale (per-tensor [1] or per-token [M, 1]) and the weight scale [N], adds the bias, and casts.

W4A4 splits each packed byte into its low-nibble and high-nibble halves and issues two dots of K/2 each (the sum over
k does not care in which order the k's come, as long as both operands use the same one), so no interleaving shuffle
is needed. With one packed operand, the unpacked nibbles are interleaved back into natural k order (join + reshape).

Skinny M (decode) has two kernels: the same tensor-core kernel with 16-row tiles, and a CUDA-core GEMV for M <= 4
that reads the packed operands as int32 words and multiplies 4 lanes per `dp4a` instruction (W4: the words
`(w << 4) & 0xF0F0F0F0` / `w & 0xF0F0F0F0` hold 16x the even-k / odd-k values; the activation words are picked to
match). Both can split K: the K-partial int32 sums are added with atomics into a zeroed workspace (exact and
order-independent), and the last program to finish an output tile (an atomic ticket counter) runs the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pq_ao.kernels.reference import check_int_linear

from ._common import NUM_SMS, cast_out, dp4a, interpreting, qrange, quantize_values, unpack_int4_x16


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # in K elements (a packed operand moves block_k // 2 bytes per row per step)
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1  # K split (programs per output tile); 0 = automatic (resolved by gemv/skinny_config)
    split_nibbles: bool = True  # W4A4 only: two half-K dots instead of interleaving
    kind: str = "mma"  # "mma": tensor cores (tl.dot); "dp4a": CUDA-core GEMV for M <= block_m <= 8

    def as_kwargs(self) -> dict:
        kw = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SPLIT_K=self.split_k,
                  num_warps=self.num_warps, num_stages=self.num_stages)
        if self.kind == "mma":
            kw.update(GROUP_M=self.group_m, SPLIT_NIBBLES=self.split_nibbles)
        return kw


@triton.jit
def _interleave_k(lo, hi, K_AXIS: tl.constexpr):
    """Interleave (lo, hi) along the K axis: result[2i] = lo[i], result[2i+1] = hi[i]."""
    if K_AXIS == 1:  # [R, KH] -> [R, 2 * KH]
        return tl.reshape(tl.join(lo, hi), (lo.shape[0], 2 * lo.shape[1]))
    else:  # [KH, C] -> [2 * KH, C]
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * lo.shape[0], lo.shape[1]))


@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _int_linear_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr,
    M, N, K, K_PER_SPLIT, NUM_SPLITS,
    stride_xm, stride_wn, stride_om, stride_xs,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TOKEN: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, INTERP: tl.constexpr,
):
    ASM: tl.constexpr = not INTERP
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
            a_lo, a_hi = unpack_int4_x16(a, ASM)
            w_lo, w_hi = unpack_int4_x16(w, ASM)
            acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
        else:
            if A_BITS == 4:
                a_lo, a_hi = unpack_int4_x16(a, ASM)
                a_op = _interleave_k(a_lo, a_hi, 1)
            else:
                a_op = a
            if W_BITS == 4:
                w_lo, w_hi = unpack_int4_x16(w, ASM)
                w_op = _interleave_k(w_lo, w_hi, 0)
            else:
                w_op = w
            acc = tl.dot(a_op, w_op, acc, out_dtype=tl.int32)

    _finish(acc, pid, offs_m, offs_n, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr, stride_om, stride_xs,
            M, N, NUM_SPLITS, A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, SPLIT_K, INTERP)


@triton.jit
def _finish(acc, tile, offs_m, offs_n, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr, stride_om, stride_xs,
            M, N, NUM_SPLITS, A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
            PER_TOKEN: tl.constexpr, SPLIT_K: tl.constexpr, INTERP: tl.constexpr):
    """SPLIT_K (constexpr bool): K is split over NUM_SPLITS programs per output tile."""
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K:
        # exact int32 partial sums; the last program of this tile to arrive does the epilogue
        acc_ptrs = ws_acc_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(acc_ptrs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are issued before the ticket (released by it)
        ticket = tl.atomic_add(ws_cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == NUM_SPLITS - 1:
            acc = tl.load(acc_ptrs, mask=out_mask, other=0, cache_modifier=".cg")
            _epilogue(acc, offs_m, offs_n, out_mask, xs_ptr, ws_ptr, b_ptr, out_ptr, stride_om, stride_xs, M, N,
                      A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, INTERP)
    else:
        _epilogue(acc, offs_m, offs_n, out_mask, xs_ptr, ws_ptr, b_ptr, out_ptr, stride_om, stride_xs, M, N,
                  A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, INTERP)


@triton.jit
def _even_bytes(x0, x1):
    """int32 words x0 = (b0 b1 b2 b3), x1 = (b4 .. b7) -> (b0 b2 b4 b6)."""
    return (x0 & 0xFF) | ((x0 >> 8) & 0xFF00) | ((x1 & 0xFF) << 16) | ((x1 << 8) & -16777216)


@triton.jit
def _odd_bytes(x0, x1):
    """-> (b1 b3 b5 b7)."""
    return ((x0 >> 8) & 0xFF) | ((x0 >> 16) & 0xFF00) | ((x1 << 8) & 0xFF0000) | (x1 & -16777216)


@triton.jit
def _gemv_loads(x_ptr, w_ptr, rows_x, rows_w, stride_xm, stride_wn, kw0, kw_end, BKW: tl.constexpr,
                A_BITS: tl.constexpr, W_BITS: tl.constexpr, QUANT_X: tl.constexpr):
    """One K step's loads for weight words kw0 .. kw0 + BKW (none past kw_end): the weight words [BLOCK_N, BKW] and
    the activations as stored: float values [BLOCK_M, BKW * VALS] (QUANT_X), int8 byte words of the even / odd
    words (A8 x W4: two words per weight word), or words [BLOCK_M, BKW] (both returned the same)."""
    offs_kw = kw0 + tl.arange(0, BKW)
    kmask = offs_kw < kw_end
    w = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_kw[None, :], mask=kmask[None, :], other=0)
    if QUANT_X:
        VALS: tl.constexpr = 8 if W_BITS == 4 else 4  # k values per weight word
        offs_k = kw0 * VALS + tl.arange(0, BKW * VALS)
        xa = tl.load(x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :], mask=offs_k[None, :] < kw_end * VALS,
                     other=0.0)
        xb = xa
    elif W_BITS == 4 and A_BITS == 8:
        x_row = x_ptr + rows_x[:, None] * stride_xm + 2 * offs_kw[None, :]
        xa = tl.load(x_row, mask=kmask[None, :], other=0)
        xb = tl.load(x_row + 1, mask=kmask[None, :], other=0)
    else:
        xa = tl.load(x_ptr + rows_x[:, None] * stride_xm + offs_kw[None, :], mask=kmask[None, :], other=0)
        xb = xa
    return w, xa, xb


@triton.jit
def _quantized_words(xv, xs_ptr, BLOCK_M: tl.constexpr, BKW: tl.constexpr, A_BITS: tl.constexpr,
                     W_BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Float activations xv [BLOCK_M, BKW * VALS] of BKW weight words -> dp4a words of their quantized values,
    matching the weight words: W4 words hold k = 8w + (0, 2, 4, 6) (lo) / 8w + (1, 3, 5, 7) (hi); W8 words
    k = 4w + (0..3)."""
    q = quantize_values(xv.to(tl.float32), tl.load(xs_ptr), QMIN, QMAX)
    if A_BITS == 4:
        q = q * 16  # the x16 form of the weight words
    q = q & 0xFF
    lane_shift = (tl.arange(0, 4) * 8)[None, None, :]
    if W_BITS == 4:
        q_even, q_odd = tl.split(tl.reshape(q, (BLOCK_M, BKW, 4, 2)))
        return tl.sum(q_even << lane_shift, axis=2), tl.sum(q_odd << lane_shift, axis=2)
    else:
        words = tl.sum(tl.reshape(q, (BLOCK_M, BKW, 4)) << lane_shift, axis=2)
        return words, words


@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _int_gemv_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr,
    M, N, KW, KW_PER_SPLIT, NUM_SPLITS,
    stride_xm, stride_wn, stride_om, stride_xs,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    INTERP: tl.constexpr, QUANT_X: tl.constexpr = False, QMIN: tl.constexpr = 0, QMAX: tl.constexpr = 0,
):
    """x_ptr / w_ptr are int32 views of the operands; KW = int32 words per weight row. Each program: BLOCK_N
    weight rows x all (<= BLOCK_M) activation rows over one K split, in [BLOCK_M, BLOCK_N, words] dp4a lanes.

    QUANT_X: x_ptr is the float activation [M, K] itself (stride_xm in elements), quantized here with the static
    scale xs_ptr[0] exactly as `quantize_static` does, and packed into dp4a words in registers."""
    ASM: tl.constexpr = not INTERP
    BKW: tl.constexpr = BLOCK_K // 8 if W_BITS == 4 else BLOCK_K // 4  # weight words per row per step
    MASK: tl.constexpr = -252645136  # 0xF0F0F0F0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BKW), dtype=tl.int32)
    kw_start = pid_k * KW_PER_SPLIT
    kw_end = tl.minimum(KW, kw_start + KW_PER_SPLIT)
    # (num_stages changes nothing in this loop: its loads feed elementwise code, which the pipeliner does not
    # buffer; a register prefetch of the next step measured no faster on an H100, 2026-12-07)
    for kw0 in range(kw_start, kw_end, BKW):
        w, xa, xb = _gemv_loads(x_ptr, w_ptr, rows_x, rows_w, stride_xm, stride_wn, kw0, kw_end, BKW, A_BITS, W_BITS,
                                QUANT_X)
        w = w[None, :, :]
        if QUANT_X:
            x_lo, x_hi = _quantized_words(xa, xs_ptr, BLOCK_M, BKW, A_BITS, W_BITS, QMIN, QMAX)
        if W_BITS == 4:
            w_lo = (w << 4) & MASK
            w_hi = w & MASK
            if QUANT_X:
                pass
            elif A_BITS == 4:
                x_lo = (xa << 4) & MASK
                x_hi = xa & MASK
            else:
                x_lo = _even_bytes(xa, xb)
                x_hi = _odd_bytes(xa, xb)
            acc = dp4a(tl.broadcast_to(w_lo, (BLOCK_M, BLOCK_N, BKW)),
                       tl.broadcast_to(x_lo[:, None, :], (BLOCK_M, BLOCK_N, BKW)), acc, ASM)
            acc = dp4a(tl.broadcast_to(w_hi, (BLOCK_M, BLOCK_N, BKW)),
                       tl.broadcast_to(x_hi[:, None, :], (BLOCK_M, BLOCK_N, BKW)), acc, ASM)
        else:
            x = x_lo if QUANT_X else xa
            acc = dp4a(tl.broadcast_to(w, (BLOCK_M, BLOCK_N, BKW)),
                       tl.broadcast_to(x[:, None, :], (BLOCK_M, BLOCK_N, BKW)), acc, ASM)
    _finish(tl.sum(acc, axis=2), pid_n, offs_m, offs_n, xs_ptr, ws_ptr, b_ptr, out_ptr, ws_acc_ptr, ws_cnt_ptr,
            stride_om, stride_xs, M, N, NUM_SPLITS, A_BITS, W_BITS, HAS_BIAS, PER_TOKEN, SPLIT_K, INTERP)


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
# Configurations: the H100 sweep winners (benchmarks/bench_linear.py --tune; docs/kernels.md).


def _split_for(tiles: int, k_steps: int, min_steps: int, per_sm: int) -> int:
    """Smallest power-of-2 K split giving >= per_sm programs per SM, keeping >= min_steps K steps per program."""
    split = 1
    while tiles * split < per_sm * NUM_SMS and (split * 2) * min_steps <= k_steps:
        split *= 2
    return split


def dp4a_supported(K: int, a_bits: int, w_bits: int) -> bool:
    """The dp4a GEMV reads int32 words: 8 packed int4 or 4 int8 values each, rows whole words."""
    return (a_bits, w_bits) in ((4, 4), (8, 4), (8, 8)) and K % 8 == 0


# The dp4a GEMV's W4A4 / W8A8 tiles: 16 weight rows x 1024 K per step, or 8 rows where N / 16 falls short of
# `per_sm` programs per multiprocessor (a K split's zeroed workspace and atomics cost more than the narrower tile:
# H100, M = 1, 2026-12-07: 6144 x 4096 8.2 us against 10.4, 4096 x 4096 6.3 against 8.4, 4096 x 14336 15.2 against
# 16.6; 28672 x 4096 stays at 16 rows, 26.4 against 28.7); the K split then fills what is still short.
GEMV = dict(block_n=(16, 8), block_k=1024, warps=4, per_sm=3)


def gemv_config(M: int, N: int, K: int, w_bits: int, block_n: int = 0, block_k: int = 0, num_warps: int = 0,
                num_stages: int = 0, split_k: int = 0, a_bits: int = 4) -> GemmConfig:
    """dp4a GEMV for M <= 8. Defaults: `GEMV` (W4A4/W8A8), 64 x 256 and 4 stages (W4A8: the H100 sweep's best);
    K split until `GEMV["per_sm"]` programs per SM."""
    w4a8 = (a_bits, w_bits) == (8, 4)
    want = GEMV["per_sm"] * NUM_SMS
    if not block_n:
        block_n = 64 if w4a8 else next((bn for bn in GEMV["block_n"] if triton.cdiv(N, bn) >= want),
                                       GEMV["block_n"][-1])
    block_k = block_k or (256 if w4a8 else GEMV["block_k"])
    num_warps = num_warps or (4 if w4a8 else GEMV["warps"])
    num_stages = num_stages or (4 if w4a8 else 3)
    block_m = 1 if M <= 1 else (2 if M <= 2 else (4 if M <= 4 else 8))
    split = split_k or _split_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k), 2, GEMV["per_sm"])
    return GemmConfig(block_m, block_n, block_k, num_warps, num_stages, group_m=1, split_k=split, kind="dp4a")


def skinny_config(M: int, N: int, K: int, w_bits: int, block_n: int = 32, block_k: int = 0, num_warps: int = 4,
                  num_stages: int = 4, split_k: int = 0) -> GemmConfig:
    block_k = block_k or (512 if w_bits == 4 else 256)
    split = split_k or _split_for(triton.cdiv(N, block_n) * triton.cdiv(M, 16), triton.cdiv(K, block_k), 2, 4)
    return GemmConfig(16, block_n, block_k, num_warps, num_stages, group_m=1, split_k=split)


PREFILL_M = 4096  # the M bucket used for programs exported with a dynamic M (prefill)


def pick_config(M: int, N: int, K: int, a_bits: int, w_bits: int) -> GemmConfig:
    """Per-M-bucket winners of the H100 sweep (geometric mean over the Llama-3-8B shapes; docs/kernels.md)."""
    if M <= 4 and dp4a_supported(K, a_bits, w_bits):
        return gemv_config(M, N, K, w_bits, a_bits=a_bits)
    if M <= 16:
        return skinny_config(M, N, K, w_bits)
    if M <= 64:
        return GemmConfig(64, 64, 256, num_warps=4, num_stages=4, group_m=8)
    if M <= 256:
        return GemmConfig(64, 128, 256, num_warps=4, num_stages=4, group_m=8)
    if (a_bits, w_bits) == (4, 4):
        return GemmConfig(256, 128, 128, num_warps=8, num_stages=3, group_m=8)
    if (a_bits, w_bits) == (8, 8):
        return GemmConfig(128, 256, 128, num_warps=8, num_stages=3, group_m=8)
    return GemmConfig(128, 128, 128, num_warps=4, num_stages=4, group_m=8)  # W4A8 winner; A4W8 untuned


# ------------------------------------------------------------------------------------------------------------------


def int_linear_with_config(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype, cfg: GemmConfig | None):
    _, _, K = check_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)  # the reference's checks
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w2 = wq if wq.stride(-1) == 1 else wq.contiguous()
    M, N = x2.shape[0], w2.shape[0]
    symbolic = not isinstance(M, int)  # torch.export with a dynamic sequence length: M is a SymInt
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if not symbolic and M == 0:
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
        # A symbolic M takes the large-M (prefill) config: branching on it would specialise the exported dim.
        cfg = pick_config(PREFILL_M if symbolic else M, N, K, a_bits, w_bits)
    has_bias = bias is not None
    b = bias if has_bias else ws
    flags = dict(A_BITS=a_bits, W_BITS=w_bits, HAS_BIAS=has_bias, PER_TOKEN=per_token, INTERP=interpreting())
    kw = cfg.as_kwargs()
    if cfg.kind == "dp4a":
        if not dp4a_supported(K, a_bits, w_bits) or M > cfg.block_m:
            raise ValueError(f"dp4a GEMV needs K % 8 == 0, W4A4/W4A8/W8A8 and M <= {cfg.block_m}: {cfg}")
        _launch_gemv(x2.view(torch.int32), xs, w2, ws, b, out, M, N, K, cfg, flags, kw)
    else:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k) * cfg.block_k
        split = triton.cdiv(K, k_per_split)
        ws_acc, ws_cnt = _workspace(split, M, N, tiles, out)
        kw["SPLIT_K"] = split > 1
        torch.library.wrap_triton(_int_linear_kernel)[(tiles, split)](
            x2, w2, xs, ws, b, out, ws_acc, ws_cnt, M, N, K, k_per_split, split,
            x2.stride(0), w2.stride(0), out.stride(0), 1,
            EVEN_K=(K % cfg.block_k == 0), **flags, **kw,
        )
    return out.reshape(*lead, N)


def _launch_gemv(x_op, xs, w2, ws, b, out, M, N, K, cfg, flags, kw, quant_x=None):
    """dp4a GEMV launch. x_op: int32 view of the quantized activations, or (quant_x = (qmin, qmax)) the float
    activations themselves, quantized in the kernel."""
    ww = w2.view(torch.int32)
    KW = ww.shape[1]
    step = cfg.block_k // (8 if flags["W_BITS"] == 4 else 4)
    kw_per_split = triton.cdiv(triton.cdiv(KW, step), cfg.split_k) * step
    split = triton.cdiv(KW, kw_per_split)
    tiles = triton.cdiv(N, cfg.block_n)
    ws_acc, ws_cnt = _workspace(split, M, N, tiles, out)
    # every kernel argument explicitly, defaults too: inductor's mutation analysis (torch 2.11) rejects a launch
    # that leaves one out, then treats every input as mutated (and re-derives that at each call site: minutes of
    # AOTI compile for a 30-layer model)
    qmin, qmax = quant_x if quant_x is not None else (0, 0)
    kw = dict(kw, SPLIT_K=split > 1, QUANT_X=quant_x is not None, QMIN=qmin, QMAX=qmax)
    torch.library.wrap_triton(_int_gemv_kernel)[(tiles, split)](
        x_op, ww, xs, ws, b, out, ws_acc, ws_cnt, M, N, KW, kw_per_split, split,
        x_op.stride(0), ww.stride(0), out.stride(0), 1, **flags, **kw,
    )


def _workspace(split: int, M: int, N: int, tiles: int, out: torch.Tensor):
    """Split-K scratch: int32 partial sums [M * N] and one ticket counter per output tile, zeroed."""
    if split == 1:
        return out, out  # unused
    workspace = torch.zeros((M * N + tiles,), dtype=torch.int32, device=out.device)
    return workspace[: M * N], workspace[M * N:]


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


def gemv_static_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`int_linear(quantize_static(x, x_scale, a_bits), x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)`,
    the same integers and outputs, from float activations x [..., K]. For one row (decode at batch 1; W4A4/W4A8/W8A8,
    K % 8 == 0) it is one kernel: the GEMV quantizes its slice of x in registers (H100: 20 us vs 22 us for the
    pair at 1x14336x4096); from 2 rows on the per-program re-quantization costs more than it saves (M = 4: 38 us
    fused vs ~28 us), so it is quantize_static + int_linear."""
    from .quant import quantize_static

    K = x.shape[-1]
    lead = x.shape[:-1]
    M = x.numel() // K if K else 0
    if not (M == 1 and dp4a_supported(K, a_bits, w_bits)) or x_scale.numel() != 1:
        return int_linear(quantize_static(x, x_scale, a_bits), x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    if wq.dtype != (torch.uint8 if w_bits == 4 else torch.int8) or x_scale.dim() == 0 or w_scale.dim() == 0:
        raise ValueError(f"wq must be {'packed uint8' if w_bits == 4 else 'int8'} (got {wq.dtype}); scales must "
                         "not be 0-d (AOTInductor rejects 0-d tensor args)")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w2 = wq if wq.stride(-1) == 1 else wq.contiguous()
    if w2.shape[-1] * (2 if w_bits == 4 else 1) != K:
        raise ValueError(f"K mismatch: activations have K={K}, weights {tuple(w2.shape)} at {w_bits} bits")
    N = w2.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    xs = x_scale.reshape(1).float()
    ws = w_scale.reshape(-1).float()
    cfg = pick_config(M, N, K, a_bits, w_bits)
    has_bias = bias is not None
    flags = dict(A_BITS=a_bits, W_BITS=w_bits, HAS_BIAS=has_bias, PER_TOKEN=False, INTERP=interpreting())
    _launch_gemv(x2, xs, w2, ws, bias if has_bias else ws, out, M, N, K, cfg, flags, cfg.as_kwargs(),
                 quant_x=qrange(a_bits))
    return out.reshape(*lead, N)
