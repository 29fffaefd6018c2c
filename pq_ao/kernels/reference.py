"""Plain-torch references of the `pq_ao::` ops: the CPU implementation and the oracle for the Triton kernels.

Every function is make_fx/fake-tensor traceable (no data-dependent control flow), because `torch.library.triton_op`
also uses the op body as its fake kernel and inductor inlines it on CPU.

Shapes (K is the logical reduction size; int4 operands are packed, `[..., K // 2]` uint8):

    hadamard_transform(x [..., n], had_k [K, K])              -> [..., n], x.dtype
    quantize_static(x [..., K], scale [1], bits)               -> int8 [..., K] | uint8 [..., K // 2]
    hadamard_quantize_static(x, had_k, scale [1], bits)        -> as quantize_static (transform kept in fp32)
    quantize_dynamic(x [..., K], bits)                         -> (q as above, scale [..., 1] fp32)
    int_linear(xq [..., K'], x_scale [1] | [..., 1], wq [N, K''], w_scale [N], bias [N] | None,
               a_bits, w_bits, out_dtype)                      -> [..., N] out_dtype
    kv_attention(q [B, Hq, Tq, D], k_codes, v_codes [B, Hkv, S, D'], k_scale, v_scale [Hkv],
                 prefix_k, prefix_v [1, Hkv, P, D], mask bool [B, Tq, S], scaling, kv_bits)
                                                               -> [B, Hq, Tq, D] q.dtype

`int_linear` is exact: `acc = xq @ wq.T` in integers, then `acc.float() * x_scale * w_scale + bias.float()` in
fp32 (left to right), cast to out_dtype. See `_exact_matmul` for how the integer product is computed fast.

`kv_attention` is softmax attention of the queries over P full-precision prefix keys (always visible) and the
S slots of a symmetric per-KV-head quantized cache (D' = D // 2 packed int4 or D int8; visible where `mask`),
in fp32, with GQA (query head h reads KV head h // (Hq // Hkv)); a row that sees nothing is 0.
"""

from __future__ import annotations

import torch

from pq_ao import hadamard, quant_math

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, _FLOATS))}), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dim, got a 0-d tensor")


def check_scale(scale: torch.Tensor, name: str, shapes: tuple[tuple[int, ...], ...]) -> None:
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if tuple(scale.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        got = "a 0-d tensor (AOTInductor rejects 0-d tensor kernel args)" if scale.dim() == 0 else list(scale.shape)
        raise ValueError(f"{name} must have shape {want}, got {got}")


def _check_had_k(had_k: torch.Tensor, n: int) -> None:
    if had_k.dim() != 2 or had_k.shape[0] != had_k.shape[1]:
        raise ValueError(f"had_k must be a square K x K matrix, got shape {tuple(had_k.shape)}")
    if not had_k.is_floating_point():
        raise TypeError(f"had_k must be floating point, got {had_k.dtype}")
    k = had_k.shape[0]
    if n % k or not hadamard.is_pow2(n // k):
        raise ValueError(f"last dim {n} is not K * 2**m for K = {k} (had_k is {k} x {k})")


def _check_even(k: int, bits: int, what: str) -> None:
    if bits == 4 and k % 2:
        raise ValueError(f"int4 packing needs an even {what}, got {k}")


def _check_qdata(q: torch.Tensor, bits: int, name: str) -> None:
    quant_math.check_bits(bits)
    want = torch.uint8 if bits == 4 else torch.int8
    if q.dtype != want:
        kind = "packed int4 (uint8, two per byte)" if bits == 4 else "int8"
        raise TypeError(f"{name} with {bits} bits must be {kind}, got {q.dtype}")
    if q.dim() < 1:
        raise ValueError(f"{name} must have at least one dim, got a 0-d tensor")


# ---------------------------------------------------------------------------------------------------------------
# Hadamard and activation quantization


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    """Orthonormal online Hadamard over the last dim: `x @ (had_k (kron) H_{2^m}).T / sqrt(n)`, in x.dtype.
    `had_k` is the K x K +-1 factor (a [1, 1] ones tensor for powers of 2). bf16/fp16 are computed in fp32."""
    _check_float(x, "x")
    _check_had_k(had_k, x.shape[-1])
    return hadamard.hadamard_transform(x, had_k)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return quant_math.pack_int4(q) if bits == 4 else q


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-tensor quantization with a `[1]` fp32 scale; int8 `[..., K]` or packed uint8 `[..., K // 2]`."""
    quant_math.check_bits(bits)
    _check_float(x, "x")
    check_scale(scale, "scale", ((1,),))
    _check_even(x.shape[-1], bits, "last dim")
    return _pack(quant_math.quantize(x, scale, bits), bits)


def hadamard_quantize_static(x: torch.Tensor, had_k: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantize_static(hadamard_transform(x, had_k), scale, bits)` with the transform output kept in fp32 (as a
    fused kernel does), so for bf16 x it can differ from the unfused pair at rounding ties of the bf16 cast."""
    quant_math.check_bits(bits)
    _check_float(x, "x")
    _check_had_k(had_k, x.shape[-1])
    check_scale(scale, "scale", ((1,),))
    _check_even(x.shape[-1], bits, "last dim")
    y = hadamard.hadamard_transform(x.float(), had_k)
    return _pack(quant_math.quantize(y, scale, bits), bits)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` from a gated MLP's joined projection `[..., 2n]` (gate first), in its dtype: what an HF MLP
    computes eagerly (`act_fn(gate_proj(x)) * up_proj(x)`), the input of its down_proj."""
    _check_float(gate_up, "gate_up")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must hold gate and up side by side (an even last dim), got {gate_up.shape[-1]}")
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def quantize_dynamic(
    x: torch.Tensor, bits: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: `scale = per_token_scale(x, clip)` `[..., 1]` fp32 (clip: fp32 `[1]`, the
    clip factor on each token's absmax, default 1), q as in quantize_static."""
    quant_math.check_bits(bits)
    _check_float(x, "x")
    _check_even(x.shape[-1], bits, "last dim")
    if clip is not None:
        check_scale(clip, "clip", ((1,),))
    scale = quant_math.per_token_scale(x, bits, 1.0 if clip is None else clip)
    return _pack(quant_math.quantize(x, scale, bits), bits), scale


# ---------------------------------------------------------------------------------------------------------------
# Integer linear


def _unpack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return quant_math.unpack_int4(q) if bits == 4 else q


def _max_abs_product_log2(a_bits: int, w_bits: int) -> int:
    # |xq * wq| <= 2**(a-1) * 2**(w-1) (qmin * qmin is the largest product)
    return a_bits + w_bits - 2


def fp32_exact_k(a_bits: int, w_bits: int) -> int:
    """The largest K for which every partial sum of an int dot product is an integer of magnitude <= 2**24, so
    exact in fp32 (W4A4 262144, W4A8 16384, W8A8 1024)."""
    return 1 << (24 - _max_abs_product_log2(a_bits, w_bits))


def _cpu_fp32_matmul_is_ieee() -> bool:
    """Whether CPU fp32 matmuls run in full fp32 (not bf16/tf32 internally); unknown settings count as no."""
    try:
        for p in (
            torch.backends.mkldnn.matmul.fp32_precision,
            torch.backends.mkldnn.fp32_precision,
            torch.backends.fp32_precision,
        ):
            if p != "none":
                return p == "ieee"
        return torch.get_float32_matmul_precision() == "highest"
    except (AttributeError, RuntimeError):
        return False


def _exact_matmul(x: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """`x @ w.T` of int8 grid values, exactly, as a float tensor holding the integer result (fp32 when the result
    fits in 2**24, else fp64).

    Why it is exact: every product is an integer with |p| <= 2**(a+w-2), so every partial sum of a length-k dot
    product, in any order and with or without FMA, is an integer of magnitude <= k * 2**(a+w-2). When that is
    <= 2**24 (fp32) every addition is exact. So on CPU with IEEE fp32 matmuls: one fp32 GEMM when
    K <= 2**(26-a-w) (W4A4: K <= 262144; W4A8: 16384), else fp32 GEMMs over K-chunks of that size, each exact,
    summed in int32 (W8A8: chunks of 1024). Elsewhere (CUDA, or reduced-precision fp32 matmul settings) one fp64
    GEMM (exact up to 2**53). `torch._int_mm` is exact too but 20-40x slower than these on CPU.
    """
    k = x.shape[-1]
    chunk = fp32_exact_k(a_bits, w_bits)
    if x.device.type != "cpu" or not _cpu_fp32_matmul_is_ieee():
        return x.double() @ w.double().T
    xf, wf = x.float(), w.float()
    if k <= chunk:
        return xf @ wf.T
    acc = None
    for k0 in range(0, k, chunk):
        part = (xf[:, k0 : k0 + chunk] @ wf[:, k0 : k0 + chunk].T).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def check_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype) -> tuple[tuple[int, ...], int, int]:
    """Validate `int_linear`'s arguments; returns (leading dims of xq, N, K)."""
    _check_qdata(xq, a_bits, "xq")
    _check_qdata(wq, w_bits, "wq")
    if wq.dim() != 2:
        raise ValueError(f"wq must be 2-D [N, K'], got shape {tuple(wq.shape)}")
    lead, n = tuple(xq.shape[:-1]), wq.shape[0]
    k = xq.shape[-1] * (2 if a_bits == 4 else 1)
    kw = wq.shape[1] * (2 if w_bits == 4 else 1)
    if k != kw:
        raise ValueError(f"reduction sizes differ: xq holds K = {k} ({list(xq.shape)}, {a_bits} bits), "
                         f"wq holds K = {kw} ({list(wq.shape)}, {w_bits} bits)")
    if k << _max_abs_product_log2(a_bits, w_bits) >= 2**31:
        raise ValueError(f"K = {k} can overflow the int32 accumulator for W{w_bits}A{a_bits}")
    check_scale(x_scale, "x_scale", ((1,), (*lead, 1)))
    check_scale(w_scale, "w_scale", ((n,),))
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    return lead, n, k


def int_linear_epilogue(acc, x_scale, w_scale, bias, lead, n, out_dtype) -> torch.Tensor:
    """`acc.float() * x_scale * w_scale + bias.float()` in fp32, left to right, then out_dtype; acc `[M, N]` holds
    the integer product (fp32, fp64 or int32)."""
    y = acc.float() if acc.dtype != torch.float32 else acc  # a fresh tensor either way: update it in place
    y.mul_(x_scale.reshape(-1, 1)).mul_(w_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.reshape(*lead, n).to(out_dtype)


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
    """`(xq @ wq.T).float() * x_scale * w_scale + bias` -> out_dtype, the integer product exact (see module doc).

    xq: int8 `[..., K]` (a_bits 8) or packed uint8 `[..., K // 2]` (a_bits 4); x_scale fp32 `[1]` (static
    per-tensor) or `[..., 1]` (dynamic per-token, as quantize_dynamic returns it). wq: int8 `[N, K]` or packed
    uint8 `[N, K // 2]`; w_scale fp32 `[N]`. bias: `[N]` of any float dtype (added in fp32) or None.
    """
    lead, n, _ = check_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    x2 = _unpack(xq.reshape(-1, xq.shape[-1]), a_bits)
    acc = _exact_matmul(x2, _unpack(wq, w_bits), a_bits, w_bits)
    return int_linear_epilogue(acc, x_scale, w_scale, bias, lead, n, out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Attention over a quantized KV cache


_Q_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_4d(t: torch.Tensor, name: str, what: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {what}, got shape {tuple(t.shape)}")


def _check_kv_attention(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, kv_bits) -> None:
    """Dtypes and shapes of `kv_attention`'s operands (see its docstring); raises TypeError / ValueError."""
    quant_math.check_bits(kv_bits)
    if q.dtype not in _Q_FLOATS:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    _check_4d(q, "q", "[B, Hq, Tq, D]")
    b, hq, tq, d = q.shape
    for name, c in (("k_codes", k_codes), ("v_codes", v_codes)):
        _check_qdata(c, kv_bits, name)
        _check_4d(c, name, "[B, Hkv, S, D // 2] (int4) or [B, Hkv, S, D] (int8)")
    if k_codes.shape != v_codes.shape:
        raise ValueError(f"k_codes and v_codes differ in shape: {list(k_codes.shape)} vs "
                         f"{list(v_codes.shape)}")
    _check_even(d, kv_bits, "head dim D")
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    want = (b, hkv, s, d // 2 if kv_bits == 4 else d)
    if tuple(k_codes.shape) != want:
        last = "D // 2" if kv_bits == 4 else "D"
        raise ValueError(f"the codes must be [B, Hkv, S, {last}] = {list(want)} for q {list(q.shape)} and "
                         f"{kv_bits} bits, got {list(k_codes.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads Hq = {hq} must be a multiple of the KV heads Hkv = {hkv}")
    check_scale(k_scale, "k_scale", ((hkv,),))
    check_scale(v_scale, "v_scale", ((hkv,),))
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check_float(t, name)
        _check_4d(t, name, "[1, Hkv, P, D]")
        if t.shape[0] != 1 or t.shape[1] != hkv or t.shape[3] != d:
            raise ValueError(f"{name} must be [1, {hkv}, P, {d}], got {list(t.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v differ in shape: {list(prefix_k.shape)} vs "
                         f"{list(prefix_v.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = may attend), got {mask.dtype}")
    if tuple(mask.shape) != (b, tq, s):
        raise ValueError(f"mask must be [B, Tq, S] = {[b, tq, s]}, got {list(mask.shape)}")


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
    """`softmax(scaling * q [prefix_k; k_hat]^T) [prefix_v; v_hat]` in fp32, cast to q.dtype.

    q: `[B, Hq, Tq, D]` fp32/bf16/fp16. k_codes, v_codes: the cache, packed int4 uint8 `[B, Hkv, S, D // 2]`
    (`quant_math.pack_int4` along D) or int8 `[B, Hkv, S, D]`; `k_hat = code * k_scale[h]` (fp32 `[Hkv]`),
    same for v. prefix_k, prefix_v: `[1, Hkv, P, D]` of any float dtype (P >= 0), not quantized, seen by every
    query. mask: bool `[B, Tq, S]`, True where a query may attend a cache slot (causality, padding, unwritten
    slots: the op applies nothing else). GQA: query head h reads KV head `h // (Hq // Hkv)`. A query row with
    no visible key (P = 0, every slot masked) is 0, not NaN.
    """
    _check_kv_attention(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, kv_bits)
    b, hq, tq, d = q.shape
    hkv, s, p = k_codes.shape[1], k_codes.shape[2], prefix_k.shape[2]
    g = hq // hkv
    if p + s == 0:  # shapes only (static under tracing): nothing to attend
        return q.new_zeros(q.shape)
    # the G * Tq query rows of one KV head: row g * Tq + t is query head h * G + g, query t
    qf = q.float().reshape(b, hkv, g * tq, d)
    k_hat = _unpack(k_codes, kv_bits).float() * k_scale.view(1, hkv, 1, 1)
    v_hat = _unpack(v_codes, kv_bits).float() * v_scale.view(1, hkv, 1, 1)
    keys = torch.cat((prefix_k.float().expand(b, -1, -1, -1), k_hat), dim=2)
    vals = torch.cat((prefix_v.float().expand(b, -1, -1, -1), v_hat), dim=2)
    logits = (qf @ keys.transpose(-1, -2)) * scaling  # [B, Hkv, G * Tq, P + S]
    seen = torch.cat((mask.new_ones(b, tq, p), mask), dim=-1)
    seen = seen[:, None, None].expand(b, 1, g, tq, p + s).reshape(b, 1, g * tq, p + s)
    logits = logits.masked_fill(~seen, float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)  # a row that sees nothing: exp(-inf) = 0 everywhere
    e = torch.exp(logits - top)
    den = e.sum(dim=-1, keepdim=True)  # >= 1 where the row sees anything (its max term is exp(0))
    out = (e @ vals) / torch.where(den > 0, den, 1.0)
    return out.reshape(b, hq, tq, d).to(q.dtype)
