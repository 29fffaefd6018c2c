"""CPU kernel of `int_linear`: the integer product on oneDNN's int8 GEMM (u8 x s8 -> s32, VNNI where the CPU has
it), the epilogue as the reference's. Exact, like the reference: same integers, same fp32 epilogue, so the two
return identical tensors; it is 4-7x faster than the reference's fp32-GEMM emulation on the 2-core CI CPU.

- Activations go in as uint8 with zero point 128 (`x ^ 0x80`); oneDNN subtracts it in the int32 accumulator.
- The weight is unpacked and prepacked once per weight tensor and kept in a small LRU (keyed by the tensor
  object; a dead or modified tensor is repacked), since prepacking costs about as much as one GEMM.
- oneDNN returns the int32 accumulator as fp32 (all scales 1), which is exact while `|acc| <= 2**24`: used only
  for `K * max|xq * wq| <= 2**24` (W4A4 K <= 262144, W4A8 K <= 16384, W8A8 K <= 1024); larger K, non-CPU tensors
  and traced calls (torch.compile / export, fake tensors) take the reference.
- Some CPUs' int8 paths saturate intermediate 16-bit sums (pre-VNNI AVX-512/AVX2 `vpmaddubsw`): each
  (a_bits, w_bits) pair is checked once against the reference on extreme values, and a mismatch keeps it off.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from pq_ao import quant_math
from pq_ao.kernels import reference

CACHE_BYTES = 2**30  # prepacked weights kept (int8, one byte per weight)
_packed: OrderedDict[int, tuple] = OrderedDict()  # id(wq) -> (weakref, version, bytes, prepacked, ones, zeros)
_verified: dict[tuple[int, int], bool] = {}


def _has_onednn_int8() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be modified outside inference)
        return -1


def _prepacked(wq: torch.Tensor, w_bits: int):
    key = id(wq)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is wq and entry[1] == _version(wq):
        _packed.move_to_end(key)
        return entry[3:]
    w = reference._unpack(wq, w_bits)
    n = w.shape[0]
    entry = (weakref.ref(wq, lambda _r, key=key: _packed.pop(key, None)), _version(wq), w.numel(),
             torch.ops.onednn.qlinear_prepack(w.contiguous(), None), torch.ones(n), torch.zeros(n, dtype=torch.long))  # fmt: skip
    _packed[key] = entry
    while sum(e[2] for e in _packed.values()) > CACHE_BYTES and len(_packed) > 1:
        _packed.popitem(last=False)
    return entry[3:]


def _matmul(x2: torch.Tensor, wq: torch.Tensor, w_bits: int) -> torch.Tensor:
    """`x2 @ unpack(wq).T` of int8 x2 `[M, K]` as fp32 (exact in the range `usable` admits)."""
    packed, ones, zeros = _prepacked(wq, w_bits)
    xu = x2.contiguous().view(torch.uint8) ^ 0x80  # x + 128
    return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")  # fmt: skip


def _exact_here(a_bits: int, w_bits: int) -> bool:
    """Whether this CPU's oneDNN int8 GEMM equals the reference on the extremes of (a_bits, w_bits)."""
    if (a_bits, w_bits) not in _verified:
        ok = False
        if _has_onednn_int8():
            (amin, amax), (wmin, wmax) = quant_math.qrange(a_bits), quant_math.qrange(w_bits)
            k = min(reference.fp32_exact_k(a_bits, w_bits), 4096)
            g = torch.Generator().manual_seed(0)
            x = torch.randint(amin, amax + 1, (6, k), generator=g, dtype=torch.int8)
            w = torch.randint(wmin, wmax + 1, (5, k), generator=g, dtype=torch.int8)
            x[0], x[1], x[2] = amin, amax, amin  # all-extreme rows: the largest sums of both signs
            w[0], w[1], w[2] = wmin, wmin, wmax
            x[3, ::2], x[3, 1::2], w[3, ::2], w[3, 1::2] = amax, amin, wmin, wmax  # alternating pairs
            try:
                ok = torch.equal(_matmul(x, w, 8).double(), x.double() @ w.double().T)
            except RuntimeError:
                pass
        _verified[(a_bits, w_bits)] = ok
    return _verified[(a_bits, w_bits)]


def usable(xq: torch.Tensor, wq: torch.Tensor, a_bits: int, w_bits: int) -> bool:
    """Whether `int_linear` can run here for these operands (see the module docstring)."""
    if xq.device.type != "cpu" or type(xq) is not torch.Tensor or type(wq) is not torch.Tensor:
        return False
    if torch.compiler.is_compiling():
        return False
    if wq.shape[-1] * (2 if w_bits == 4 else 1) > reference.fp32_exact_k(a_bits, w_bits):
        return False
    return _exact_here(a_bits, w_bits)


def int_linear(xq, x_scale, wq, w_scale, bias, a_bits: int, w_bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """`reference.int_linear` with the integer product on oneDNN; call only where `usable` holds."""
    lead, n, _ = reference.check_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    x2 = reference._unpack(xq.reshape(-1, xq.shape[-1]), a_bits)
    acc = _matmul(x2, wq, w_bits)
    return reference.int_linear_epilogue(acc, x_scale, w_scale, bias, lead, n, out_dtype)
