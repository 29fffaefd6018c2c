"""Convert: a calibrated linear becomes an `nn.Linear` whose weight is an `IntxLinearWeight`.

Invariant: the converted linear computes, with integer kernels, exactly what calibration measured: its input
(after the online Hadamard, which moves from an `HadamardLinear` module into the weight so kernels can fuse it)
quantized with the static scale or per token, times the per-channel quantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from pq_ao.tensors import IntxLinearWeight


def quantize_linear(
    linear: nn.Linear,
    *,
    w_bits: int,
    a_bits: int,
    act_mode: str,
    act_scale: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    act_clip: float | None = None,
) -> nn.Linear:
    """Quantize `linear` (an `nn.Linear`, or an `HadamardLinear` whose R4 moves into the weight). Returns the module
    to use: `linear` itself, or a plain `nn.Linear` replacing an `HadamardLinear` (see `replace_child`)."""
    had_k = getattr(linear, "had_k", None)
    weight = IntxLinearWeight.from_float(
        linear.weight.detach(),
        w_bits=w_bits,
        a_bits=a_bits,
        act_mode=act_mode if a_bits < 16 else "none",
        act_scale=act_scale,
        had_k=had_k,
        clip=clip,
        act_clip=act_clip,
    )
    if had_k is not None:
        plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        plain.bias = linear.bias
        linear = plain
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def replace_child(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    if old is new:
        return
    for name, mod in parent.named_children():
        if mod is old:
            setattr(parent, name, new)
            return
    raise ValueError(f"{type(old).__name__} is not a direct child of {type(parent).__name__}")
