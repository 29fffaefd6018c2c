"""Decode attention over a packed int4 (or int8) KV cache plus a full-precision prefix (flash-decoding).

One program per (batch, KV head, split of the S cache slots). All `G * Tq` query rows of a KV head
(G = Hq // Hkv query heads share it, Tq queries each) form one tile of BLOCK_M >= 16 rows (tl.dot's minimum),
so every cache byte is read once per step for all of them. Per BLOCK_S slots: load the packed bytes of K and
V, unpack in registers, and with q split into its even and odd columns (the low and high nibbles of a byte):

    logits = (q_even @ k_lo^T + q_odd @ k_hi^T) * (scaling * log2(e) * k_scale[h])   (no interleaving)
    out_even += p @ v_lo,  out_odd += p @ v_hi,  times v_scale[h]                      (even/odd columns)

with an fp32 online softmax (exp2, running max and sum; masked slots are -inf; a row that has seen nothing
keeps max -inf and contributes 0). The prefix (P keys, any P, usually <= 16) is a first pass of split 0, in
fp32 (`ieee` dots). Whole blocks of a split load without slot masks (wide, cp.async-pipelined loads, the mask
bytes too); its last partial block runs masked. Splits write (out / sum, log2-sum-exp) partials that a second
kernel merges; with one split the main kernel writes the output.

Operands of the cache dots: exact code values in q's dtype (int4 through `_nibbles`, int8 converted);
bf16/fp16 q as it is, so q @ k is exact products summed in fp32; p is rounded to q's dtype for p @ v (as flash
attention does). fp32 q runs the same dots in fp32 with `tf32x3` (about fp32 accuracy). Design notes and H200
numbers: docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from pq_ao.kernels import reference

from ._common import NUM_SMS, cast_out, interpreting, next_pow2

MAX_ROWS = 64  # G * Tq above this: the reference (one tile would not fit in registers)


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters; the defaults are the best of the H200 sweep (docs/kernels.md)."""

    block_s: int = 0  # cache slots per step; 0 = automatic (`pick_block_s`)
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int = 0  # programs per (batch, KV head) over S; 0 = automatic (`pick_splits`)
    skip_masked: bool = False  # predicate the K/V loads of slots that no row of the tile sees (20-75 % slower
    # on a full cache, measured; pays off only when most slots are masked, e.g. a mostly empty static cache)


@triton.jit
def _halves(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """[ROWS, 2 * HALF] -> (even columns, odd columns), [ROWS, HALF] each."""
    return tl.split(tl.reshape(x, (ROWS, HALF, 2)))


# int4 -> bf16 / fp16 in registers, 4 bytes per 32-bit word: `prmt` moves bytes 0, 1 (or 2, 3) into the two
# 16-bit halves, `lop3` keeps a nibble and XORs in MAGIC, the bits of 2**e + 8 (e = 7 for bf16, 10 for fp16,
# where the ulp is 1), so a half reads 2**e + 8 + code (code ^ 8 is code + 8 in offset binary); a packed fma
# subtracts 2**e + 8. Exact, about 1.5 instructions per value instead of an int -> float convert per value (a
# quarter-rate op).
# One line: inductor copies kernel globals as repr()s into a triple-quoted source string, where torch 2.11 turns
# a repr's escaped newline back into a real one and the generated module no longer parses.
_NIBBLE_ASM = " ".join((
    "{{ .reg .b32 t, u, one, neg;",
    "mov.b32 one, {one};",
    "mov.b32 neg, {neg};",
    "prmt.b32 t, $2, 0, 0x4140;{shift}",
    "lop3.b32 u, t, 0x000F000F, {magic}, 0x6a;",
    "fma.rn.{ty}x2 $0, u, one, neg;",
    "prmt.b32 t, $2, 0, 0x4342;{shift}",
    "lop3.b32 u, t, 0x000F000F, {magic}, 0x6a;",
    "fma.rn.{ty}x2 $1, u, one, neg; }}",
))
_BF16 = dict(one="0x3F803F80", neg="0xC308C308", magic="0x43084308", ty="bf16")  # 1.0, -136.0, 136 | 0
_FP16 = dict(one="0x3C003C00", neg="0xE408E408", magic="0x64086408", ty="f16")  # 1.0, -1032.0, 1032 | 0
NIBBLE_LO_BF16 = tl.constexpr(_NIBBLE_ASM.format(shift="", **_BF16))
NIBBLE_HI_BF16 = tl.constexpr(_NIBBLE_ASM.format(shift=" shr.b32 t, t, 4;", **_BF16))
NIBBLE_LO_FP16 = tl.constexpr(_NIBBLE_ASM.format(shift="", **_FP16))
NIBBLE_HI_FP16 = tl.constexpr(_NIBBLE_ASM.format(shift=" shr.b32 t, t, 4;", **_FP16))


@triton.jit
def _nibbles(packed, DOT: tl.constexpr, ASM: tl.constexpr):
    """uint8 packed pairs -> (low nibbles, high nibbles) as signed values in DOT, exact, same shape."""
    if ASM and DOT == tl.bfloat16:
        lo = tl.inline_asm_elementwise(NIBBLE_LO_BF16, "=r,=r,r", [packed], dtype=tl.bfloat16, is_pure=True,
                                       pack=4)
        hi = tl.inline_asm_elementwise(NIBBLE_HI_BF16, "=r,=r,r", [packed], dtype=tl.bfloat16, is_pure=True,
                                       pack=4)
        return lo, hi
    elif ASM and DOT == tl.float16:
        lo = tl.inline_asm_elementwise(NIBBLE_LO_FP16, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True,
                                       pack=4)
        hi = tl.inline_asm_elementwise(NIBBLE_HI_FP16, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True,
                                       pack=4)
        return lo, hi
    else:  # fp32 q, or the interpreter (whose int -> bf16 casts are wrong: through fp32)
        lo = (packed << 4).to(tl.int8, bitcast=True) >> 4
        hi = packed.to(tl.int8, bitcast=True) >> 4
        return lo.to(tl.float32).to(DOT), hi.to(tl.float32).to(DOT)


@triton.jit
def _load2d(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load with only the masks that are needed (an unmasked or row-masked tile loads in wide vectors)."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0)
    else:
        return tl.load(ptrs)


@triton.jit
def _codes(ptr, offs_s, s_ok, stride_s, stride_d, D: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr,
           KV_BITS: tl.constexpr, DOT: tl.constexpr, MASK_S: tl.constexpr, ASM: tl.constexpr):
    """BLOCK_S cache rows -> (even-column codes, odd-column codes) as DOT values, [BLOCK_S, HALF] each; rows
    where not s_ok (with MASK_S) are not read (0)."""
    rows = ptr + offs_s.to(tl.int64)[:, None] * stride_s
    if KV_BITS == 4:
        offs_j = tl.arange(0, HALF)
        packed = _load2d(rows + offs_j[None, :] * stride_d, s_ok, offs_j < D // 2, MASK_S, 2 * HALF != D)
        return _nibbles(packed, DOT, ASM)
    else:
        offs_d = tl.arange(0, 2 * HALF)
        c = _load2d(rows + offs_d[None, :] * stride_d, s_ok, offs_d < D, MASK_S, 2 * HALF != D)
        even, odd = _halves(c, BLOCK_S, HALF)
        if ASM:
            return even.to(DOT), odd.to(DOT)
        else:
            return even.to(tl.float32).to(DOT), odd.to(tl.float32).to(DOT)


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b (+ acc) in fp32. The interpreter's bf16 dot multiplies raw bits: there, the same values in
    fp32."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _softmax_step(x, m_i, l_i):
    """Online softmax over a block of log2-domain logits x (-inf = masked): (p, alpha, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2(-inf - 0) = 0, no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(x - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _cache_block(s0, s_end, q_e, q_o, m_i, l_i, acc_e, acc_o, k_base, v_base, mask_rows, m_ok, qk_scale,
                 v_scale, sk_s, sk_d, sv_s, sv_d, sm_s, D: tl.constexpr, HALF: tl.constexpr,
                 KV_BITS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_S: tl.constexpr,
                 TAIL: tl.constexpr, SKIP_MASKED: tl.constexpr, INTERP: tl.constexpr):
    """One step of BLOCK_S slots from s0: the online-softmax state after it. TAIL: slots from s_end on do not
    exist (masked loads); otherwise the block is whole and its loads need no slot masks."""
    ASM: tl.constexpr = not INTERP
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_ok = offs_s < s_end
    seen = _load2d(mask_rows + offs_s[None, :] * sm_s, m_ok, s_ok, True, TAIL) != 0
    if SKIP_MASKED:
        s_ok = s_ok & (tl.max(seen.to(tl.int32), axis=0) > 0)
    mask_s: tl.constexpr = TAIL or SKIP_MASKED
    k_e, k_o = _codes(k_base, offs_s, s_ok, sk_s, sk_d, D, HALF, BLOCK_S, KV_BITS, DOT, mask_s, ASM)
    x = _mm(q_o, tl.trans(k_o), _mm(q_e, tl.trans(k_e), None, PREC, INTERP), PREC, INTERP)
    x = tl.where(seen, x * qk_scale, float("-inf"))
    p, alpha, m_i, l_i = _softmax_step(x, m_i, l_i)
    v_e, v_o = _codes(v_base, offs_s, s_ok, sv_s, sv_d, D, HALF, BLOCK_S, KV_BITS, DOT, mask_s, ASM)
    p = cast_out(p, DOT, INTERP)
    acc_e = acc_e * alpha[:, None] + _mm(p, v_e, None, PREC, INTERP) * v_scale
    acc_o = acc_o * alpha[:, None] + _mm(p, v_o, None, PREC, INTERP) * v_scale
    return m_i, l_i, acc_e, acc_o


@triton.jit(do_not_specialize=["S", "P", "BLOCKS_PER_SPLIT"])
def _kv_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, part_ptr, lse_ptr,
    scaling, HKV, G, TQ, S, P, BLOCKS_PER_SPLIT, NUM_SPLITS,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    spk_h, spk_p, spk_d, spv_h, spv_p, spv_d, sm_b, sm_t, sm_s,
    D: tl.constexpr, HALF: tl.constexpr, KV_BITS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    SPLIT: tl.constexpr, SKIP_MASKED: tl.constexpr, INTERP: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    DOT: tl.constexpr = q_ptr.dtype.element_ty
    sm_scale = tl.cast(scaling, tl.float32) * LOG2E  # log2 units; inductor passes a Python float as an fp64 scalar
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    M = G * TQ
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    t = offs_m % TQ
    head = (h * G + offs_m // TQ).to(tl.int64)
    offs_d = tl.arange(0, 2 * HALF)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_e, q_o = _halves(q, BLOCK_M, HALF)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_e = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)

    # prefix: split 0 only, fp32 throughout; every row sees every prefix key
    q_e32 = q_e.to(tl.float32)
    q_o32 = q_o.to(tl.float32)
    p_end = tl.where(pid_s == 0, P, 0)
    for p0 in range(0, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        pmask = p_ok[:, None] & d_ok[None, :]
        pk = tl.load(pk_ptr + h * spk_h + offs_p[:, None] * spk_p + offs_d[None, :] * spk_d, mask=pmask,
                     other=0.0)
        pk_e, pk_o = _halves(pk.to(tl.float32), BLOCK_P, HALF)
        x = tl.dot(q_e32, tl.trans(pk_e), input_precision="ieee")
        x = tl.dot(q_o32, tl.trans(pk_o), x, input_precision="ieee")
        x = tl.where(p_ok[None, :], x * sm_scale, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(x, m_i, l_i)
        pv = tl.load(pv_ptr + h * spv_h + offs_p[:, None] * spv_p + offs_d[None, :] * spv_d, mask=pmask,
                     other=0.0)
        pv_e, pv_o = _halves(pv.to(tl.float32), BLOCK_P, HALF)
        acc_e = acc_e * alpha[:, None] + tl.dot(p, pv_e, input_precision="ieee")
        acc_o = acc_o * alpha[:, None] + tl.dot(p, pv_o, input_precision="ieee")

    # the cache slots of this split: whole blocks (no slot masks: wide, pipelined loads), then a partial one
    qk_scale = sm_scale * tl.load(ks_ptr + h)
    v_scale = tl.load(vs_ptr + h)
    k_base = k_ptr + b * sk_b + h.to(tl.int64) * sk_h
    v_base = v_ptr + b * sv_b + h.to(tl.int64) * sv_h
    mask_rows = mask_ptr + b * sm_b + t[:, None] * sm_t
    s_start = pid_s * BLOCKS_PER_SPLIT * BLOCK_S  # a multiple of BLOCK_S (the compiler sees the alignment)
    s_end = tl.minimum(S, s_start + BLOCKS_PER_SPLIT * BLOCK_S)
    n_whole = (s_end - s_start) // BLOCK_S
    for i in range(0, n_whole):
        m_i, l_i, acc_e, acc_o = _cache_block(
            s_start + i * BLOCK_S, s_end, q_e, q_o, m_i, l_i, acc_e, acc_o, k_base, v_base, mask_rows, m_ok,
            qk_scale, v_scale, sk_s, sk_d, sv_s, sv_d, sm_s, D, HALF, KV_BITS, DOT, PREC, BLOCK_S, False,
            SKIP_MASKED, INTERP)
    if s_start + n_whole * BLOCK_S < s_end:
        m_i, l_i, acc_e, acc_o = _cache_block(
            s_start + n_whole * BLOCK_S, s_end, q_e, q_o, m_i, l_i, acc_e, acc_o, k_base, v_base, mask_rows,
            m_ok, qk_scale, v_scale, sk_s, sk_d, sv_s, sv_d, sm_s, D, HALF, KV_BITS, DOT, PREC, BLOCK_S, True,
            SKIP_MASKED, INTERP)

    seen_any = l_i > 0.0
    inv = 1.0 / tl.where(seen_any, l_i, 1.0)
    o = tl.reshape(tl.join(acc_e * inv[:, None], acc_o * inv[:, None]), (BLOCK_M, 2 * HALF))
    rows = pid_bh.to(tl.int64) * M + offs_m  # row of [B * Hkv * G * Tq] = row of [B, Hq, Tq] (contiguous)
    omask = m_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = (rows * NUM_SPLITS + pid_s)  # partials [B * Hkv * M, NUM_SPLITS, D], lse [.., NUM_SPLITS]
        tl.store(part_ptr + part[:, None] * D + offs_d[None, :], o, mask=omask)
        lse = tl.where(seen_any, m_i + tl.log2(tl.where(seen_any, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=m_ok)
    else:
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], cast_out(o, out_ptr.dtype.element_ty, INTERP),
                 mask=omask)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, NUM_SPLITS, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    """One output row: the partials of its NUM_SPLITS splits weighted by exp2(lse - max lse)."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NUM_SPLITS
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_n, mask=n_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    o = tl.load(part_ptr + (row * NUM_SPLITS + offs_n[:, None]) * D + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    total = tl.sum(w, axis=0)
    y = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + offs_d, cast_out(y, out_ptr.dtype.element_ty, INTERP), mask=offs_d < D)


# ------------------------------------------------------------------------------------------------------------
# Launch


def pick_block_s(bh: int, s: int) -> int:
    """128 slots per step when that makes >= 2 steps per SM in all, else 64 (the H200 sweep's winners)."""
    return 128 if bh * triton.cdiv(max(s, 1), 128) >= 2 * NUM_SMS else 64


def pick_splits(bh: int, s: int, block_s: int, min_blocks: int = 2, per_sm: int = 3,
                max_splits: int = 128) -> int:
    """Splits of S per (batch, KV head): enough programs for ~per_sm per SM, each >= min_blocks steps of S."""
    blocks = triton.cdiv(max(s, 1), block_s)
    want = triton.cdiv(per_sm * NUM_SMS, max(bh, 1))
    return max(1, min(want, triton.cdiv(blocks, min_blocks), max_splits))


def _dot_precision(dtype: torch.dtype):
    """tl.dot input precision of the cache dots: fp32 q as 3 tf32 products (~fp32); else the operands'."""
    return "tf32x3" if dtype == torch.float32 else None


def kv_attention_with_config(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, scaling: float,
                             kv_bits: int, cfg: AttnConfig | None) -> torch.Tensor:
    """`kv_attention` with explicit launch parameters (None: the defaults); validates like the reference."""
    reference._check_kv_attention(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, kv_bits)
    B, Hq, Tq, D = q.shape
    Hkv, S, P = k_codes.shape[1], k_codes.shape[2], prefix_k.shape[2]
    G = Hq // Hkv
    M = G * Tq
    if M > MAX_ROWS:
        return reference.kv_attention(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask,
                                      scaling, kv_bits)
    cfg = cfg or AttnConfig()
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    half = max(16, next_pow2(D // 2 + D % 2))  # tl.dot needs >= 16 along the head dim
    block_s = cfg.block_s or pick_block_s(B * Hkv, S)
    splits = cfg.num_splits or pick_splits(B * Hkv, S, block_s)
    blocks_per_split = triton.cdiv(triton.cdiv(max(S, 1), block_s), splits)
    splits = triton.cdiv(triton.cdiv(max(S, 1), block_s), blocks_per_split)  # every split non-empty
    block_m = max(16, next_pow2(M))
    # empty operands (P = 0, S = 0) are never read: any valid pointer will do
    k_op, v_op = (k_codes, v_codes) if S > 0 else (q, q)
    pk_op, pv_op = (prefix_k, prefix_v) if P > 0 else (q, q)
    mask_op = mask.to(torch.uint8) if S > 0 else q
    rows = B * Hkv * M
    if splits > 1:
        part = torch.empty((rows, splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # unused
    # bare `wrap_triton` calls: triton_op's source scan finds these kernels (for the AOTAutograd cache key)
    wrap_triton(_kv_attention_kernel)[(B * Hkv, splits)](
        q, k_op, v_op, k_scale.contiguous(), v_scale.contiguous(), pk_op, pv_op, mask_op, out, part, lse,
        float(scaling), Hkv, G, Tq, S, P, blocks_per_split, splits,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        *_strides4(k_op, S), *_strides4(v_op, S),
        *_strides3(pk_op, P), *_strides3(pv_op, P), *_mask_strides(mask_op, S),
        D=D, HALF=half, KV_BITS=kv_bits, PREC=_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_S=block_s,
        BLOCK_P=16, SPLIT=splits > 1, SKIP_MASKED=cfg.skip_masked, INTERP=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        wrap_triton(_combine_kernel)[(rows,)](
            part, lse, out, splits, D=D, BLOCK_N=next_pow2(splits), BLOCK_D=next_pow2(D),
            INTERP=interpreting(), num_warps=4,
        )
    return out


def _strides4(t: torch.Tensor, n: int) -> tuple[int, int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2), t.stride(3)) if n > 0 else (0, 0, 0, 0)


def _strides3(t: torch.Tensor, n: int) -> tuple[int, int, int]:
    return (t.stride(1), t.stride(2), t.stride(3)) if n > 0 else (0, 0, 0)


def _mask_strides(t: torch.Tensor, n: int) -> tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2)) if n > 0 else (0, 0, 0)


def kv_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    kv_bits: int,
) -> torch.Tensor:
    """Attention of q `[B, Hq, Tq, D]` over the prefix `[1, Hkv, P, D]` and the quantized cache (packed int4
    `[B, Hkv, S, D // 2]` or int8 `[B, Hkv, S, D]`, per-head scales `[Hkv]`, slots visible where mask
    `[B, Tq, S]`), as `reference.kv_attention`; `G * Tq > MAX_ROWS` runs the reference."""
    return kv_attention_with_config(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, scaling,
                                    kv_bits, None)
