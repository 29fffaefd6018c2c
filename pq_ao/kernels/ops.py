"""The `pq_ao::` operators: `torch.library.triton_op`s whose body picks the implementation by device.

CUDA -> the launcher of the same name in `pq_ao.kernels.triton` (same signature as the reference; it calls
`wrap_triton`), falling back to the reference when that module or function is missing; `int_linear` on CPU ->
`pq_ao.kernels.cpu` (oneDNN int8, eager only) where it is exact; anything else -> the plain-torch reference
(`pq_ao.kernels.reference`).

Why `triton_op` for both: eager calls the body directly; `torch.compile` decomposes the op into its body (inductor
inlines the aten ops of the reference on CPU, or compiles the wrapped Triton kernels on CUDA); `torch.export`
keeps `torch.ops.pq_ao.*` nodes in the graph; AOTInductor decomposes them again, so a .pt2 package holds only aten
ops and compiled kernels and loads without importing pq_ao.

The launchers are looked up once, at import, and bound to module globals that the op bodies call by name:
`triton_op` reads the body's source to find the Triton kernels it launches (AOTAutograd's cache key includes
their source), and it can only follow plain-name calls.
"""

import importlib
from typing import Callable, Optional

import torch

from pq_ao.kernels import cpu, reference

__all__ = [
    "hadamard_transform", "quantize_static", "hadamard_quantize_static", "quantize_dynamic", "int_linear",
    "static_linear", "swiglu_static_linear", "kv_attention",
]


def _launcher(name: str) -> Optional[Callable]:
    try:
        module = importlib.import_module("pq_ao.kernels.triton")
    except ImportError:  # no triton installed, or no kernels yet
        return None
    return getattr(module, name, None)


_triton_hadamard_transform = _launcher("hadamard_transform")
_triton_quantize_static = _launcher("quantize_static")
_triton_hadamard_quantize_static = _launcher("hadamard_quantize_static")
_triton_quantize_dynamic = _launcher("quantize_dynamic")
_triton_int_linear = _launcher("int_linear")
_triton_static_linear = _launcher("static_linear")
_triton_swiglu_static_linear = _launcher("swiglu_static_linear")
_triton_kv_attention = _launcher("kv_attention")


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


@torch.library.triton_op("pq_ao::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    if _on_cuda(x) and _triton_hadamard_transform is not None:
        return _triton_hadamard_transform(x, had_k)
    return reference.hadamard_transform(x, had_k)


@torch.library.triton_op("pq_ao::quantize_static", mutates_args=())
def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if _on_cuda(x) and _triton_quantize_static is not None:
        return _triton_quantize_static(x, scale, bits)
    return reference.quantize_static(x, scale, bits)


@torch.library.triton_op("pq_ao::hadamard_quantize_static", mutates_args=())
def hadamard_quantize_static(x: torch.Tensor, had_k: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if _on_cuda(x) and _triton_hadamard_quantize_static is not None:
        return _triton_hadamard_quantize_static(x, had_k, scale, bits)
    return reference.hadamard_quantize_static(x, had_k, scale, bits)


@torch.library.triton_op("pq_ao::quantize_dynamic", mutates_args=())
def quantize_dynamic(
    x: torch.Tensor, bits: int, clip: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if _on_cuda(x) and _triton_quantize_dynamic is not None:
        return _triton_quantize_dynamic(x, bits, clip)
    return reference.quantize_dynamic(x, bits, clip)


@torch.library.triton_op("pq_ao::int_linear", mutates_args=())
def int_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if _on_cuda(xq) and _triton_int_linear is not None:
        return _triton_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    return _cpu_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)


def _cpu_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype):
    if cpu.usable(xq, wq, a_bits, w_bits):
        return cpu.int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    return reference.int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)


@torch.library.triton_op("pq_ao::static_linear", mutates_args=())
def static_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    had_k: Optional[torch.Tensor],
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The linear of a static `IntxLinearWeight`: `int_linear(quantize_static(hadamard(x)), ...)` in one op, so
    that each device can pick its path per shape (CUDA: `pq_ao.kernels.triton.linear`), with the same integers."""
    if _on_cuda(x) and _triton_static_linear is not None:
        return _triton_static_linear(x, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    return _cpu_static_linear(x, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype)


def _cpu_static_linear(x, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype):
    if had_k is not None:
        xq = reference.hadamard_quantize_static(x, had_k, x_scale, a_bits)
    else:
        xq = reference.quantize_static(x, x_scale, a_bits)
    return _cpu_int_linear(xq, x_scale, wq, w_scale, bias, a_bits, w_bits, out_dtype)


@torch.library.triton_op("pq_ao::swiglu_static_linear", mutates_args=())
def swiglu_static_linear(
    gate_up: torch.Tensor,
    x_scale: torch.Tensor,
    had_k: Optional[torch.Tensor],
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_bits: int,
    w_bits: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A gated MLP's down_proj from its joined gate/up projection `[..., 2K]` (gate first):
    `static_linear(silu(gate) * up, ...)` (`reference.swiglu`). On CUDA the gating happens in the loads of the
    (Hadamard +) quantizer, so `silu(gate) * up` is never written out."""
    if _on_cuda(gate_up) and _triton_swiglu_static_linear is not None:
        return _triton_swiglu_static_linear(gate_up, x_scale, had_k, wq, w_scale, bias, a_bits, w_bits, out_dtype)
    return _cpu_static_linear(reference.swiglu(gate_up), x_scale, had_k, wq, w_scale, bias, a_bits, w_bits,
                              out_dtype)  # fmt: skip


@torch.library.triton_op("pq_ao::kv_attention", mutates_args=())
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
    args = (q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, scaling, kv_bits)
    if _on_cuda(q) and _triton_kv_attention is not None:
        return _triton_kv_attention(*args)
    return reference.kv_attention(*args)


# ---------------------------------------------------------------------------------------------------------------
# Autograd: the exact derivative where there is one, so that running a quantized model with grad mode on (and
# under torch.compile, which traces the backward) works. The Hadamard is linear (its adjoint is the transform by
# had_k.T); rounding has zero derivative (like torch.round), so the quantizers pass no gradient to x (a straight-
# through estimator is `quant_math.fake_quantize(..., ste=True)`); int_linear is differentiable in bias only;
# kv_attention (inference over a quantized cache) passes none.


def _no_grads(ctx, *grads):
    return (None,) * ctx.num_inputs


def _save_num_inputs(ctx, inputs, output):
    ctx.num_inputs = len(inputs)


def _hadamard_setup(ctx, inputs, output):
    ctx.had_k = inputs[1]


def _hadamard_backward(ctx, grad):
    return hadamard_transform(grad, ctx.had_k.T.contiguous()), None


def _int_linear_setup(ctx, inputs, output):
    bias = inputs[4]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_grad(ctx, grad, index: int, num_inputs: int) -> tuple:
    """Gradients of a quantized linear's inputs: only the bias (input `index`) has one."""
    grads = [None] * num_inputs
    if ctx.needs_input_grad[index]:
        grads[index] = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return tuple(grads)


def _int_linear_backward(ctx, grad):
    return _bias_grad(ctx, grad, 4, 8)


def _static_linear_setup(ctx, inputs, output):
    bias = inputs[5]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _static_linear_backward(ctx, grad):
    return _bias_grad(ctx, grad, 5, 9)


hadamard_transform.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
int_linear.register_autograd(_int_linear_backward, setup_context=_int_linear_setup)
static_linear.register_autograd(_static_linear_backward, setup_context=_static_linear_setup)
swiglu_static_linear.register_autograd(_static_linear_backward, setup_context=_static_linear_setup)
for _op in (quantize_static, hadamard_quantize_static, quantize_dynamic, kv_attention):
    _op.register_autograd(_no_grads, setup_context=_save_num_inputs)
