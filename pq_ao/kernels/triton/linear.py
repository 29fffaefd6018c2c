"""`static_linear` on CUDA: a static-activation quantized linear from float activations, the path picked per shape.

`y = int_linear(quantize(hadamard(x)), x_scale, wq, w_scale, bias)`, the same integers on every path:
- W4A4 with a bf16 output from `fp8_linear.FP8_MIN_M` rows on (prefill), or a symbolic row count: the activations
  are quantized (after the online Hadamard, fused) straight to one e4m3 code per value, and the GEMM runs on the
  fp8 tensor cores (`fp8_linear`);
- one row without an online Hadamard (decode): the int4 GEMV quantizes its slice of x in registers (one launch);
- otherwise: the (Hadamard +) static quantizer to packed codes, then the Triton int GEMM / GEMV (`gemm`).

`swiglu_static_linear` is the same for a gated MLP's down_proj, from the joined gate/up projection: the Hadamard
quantizer computes `silu(gate) * up` in its loads.
"""

from __future__ import annotations

import torch

from pq_ao.kernels import reference

from . import fp8_linear, gemm
from .hadamard import hadamard_quantize_static, hadamard_quantize_static_e4m3
from .quant import quantize_static_e4m3


def static_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    had_k: torch.Tensor | None,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x [..., K] float; x_scale fp32 [1]; had_k [K_h, K_h] (online Hadamard of x first) or None; wq / w_scale /
    bias as `int_linear`'s. Returns [..., N] out_dtype."""
    return _static_linear(x, False, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype)


def swiglu_static_linear(
    gate_up: torch.Tensor,
    x_scale: torch.Tensor,
    had_k: torch.Tensor | None,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`static_linear(silu(gate) * up, ...)` from the joined gate_up [..., 2K]: with an online Hadamard (R4, the
    rotated down_proj) the gating runs in the Hadamard quantizer's loads; without one, in torch before the usual path
    (compiled, inductor fuses it into its neighbours)."""
    if had_k is None:
        return static_linear(reference.swiglu(gate_up), x_scale, None, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    return _static_linear(gate_up, True, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype)


def _static_linear(x, gated, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype):
    """gated: x is a joined [gate | up] [..., 2K] and the linear's input `silu(gate) * up` (had_k given)."""
    width = x.shape[-1]
    k, n = (width // 2 if gated else width), wq.shape[0]
    m = x.numel() // width if width else 0
    large = not isinstance(m, int) or m >= fp8_linear.FP8_MIN_M  # a SymInt: an exported prefill program
    if large and fp8_linear.usable(n, k, a_bits, w_bits, out_dtype, bias):
        if had_k is not None:
            codes = hadamard_quantize_static_e4m3(x, had_k, x_scale, gated=gated)
        else:
            codes = quantize_static_e4m3(x, x_scale)
        return fp8_linear.e4m3_int4_linear(codes, x_scale, wq, w_scale, bias, out_dtype)
    if had_k is None:
        return gemm.gemv_static_linear(x, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    xq = hadamard_quantize_static(x, had_k, x_scale, a_bits, gated=gated)
    return gemm.int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
