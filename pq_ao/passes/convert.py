"""Convert: a calibrated linear becomes an `nn.Linear` whose weight is an `IntxLinearWeight`.

Invariant: the converted linear computes, with integer kernels, exactly what calibration measured: its input
(after the online Hadamard, which moves from an `HadamardLinear` module into the weight so kernels can fuse it)
quantized with the static scale or per token, times the per-channel quantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pq_ao import quant_math
from pq_ao.tensors import IntxLinearWeight


@dataclass
class SitePlan:
    """What calibration decided for the linears of one activation site: the absmax of their (effective) input,
    whose min-max scale starts the activation grid (static mode), and per linear the per-output-channel weight clip
    factors (None: min-max). The activation clip factor is searched afterwards, on the converted weights, through
    `IntxLinearWeight.set_act_range`."""

    act_absmax: float
    weight_clips: list[torch.Tensor | None]
    weights: list[torch.Tensor | None] | None = None  # GPTQ: the weights to quantize instead (on their scales' grid)
    weight_scales: list[torch.Tensor | None] | None = None  # GPTQ: the per-channel scales they were rounded with


def convert_site(linears: list[nn.Module], plan: SitePlan, *, w_bits: int, a_bits: int, act_mode: str) -> list[nn.Module]:
    """`quantize_linear` for each linear of a site, from its plan; returns the modules to use (see
    `quantize_linear`)."""
    static = act_mode == "static" and a_bits < 16
    dynamic = act_mode == "dynamic" and a_bits < 16
    scale = None
    if static:
        absmax = torch.tensor([plan.act_absmax], device=linears[0].weight.device)
        scale = quant_math.scale_from_absmax(absmax, a_bits)
    weights = plan.weights or [None] * len(linears)
    scales = plan.weight_scales or [None] * len(linears)
    return [quantize_linear(lin, w_bits=w_bits, a_bits=a_bits, act_mode=act_mode, act_scale=scale,
                            clip=None if w_scale is not None else clip, act_clip=1.0 if dynamic else None,
                            weight=weight, w_scale=w_scale)
            for lin, clip, weight, w_scale in zip(linears, plan.weight_clips, weights, scales)]  # fmt: skip


def quantize_linear(
    linear: nn.Linear,
    *,
    w_bits: int,
    a_bits: int,
    act_mode: str,
    act_scale: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    act_clip: float | None = None,
    weight: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> nn.Linear:
    """Quantize `linear` (an `nn.Linear`, or an `HadamardLinear` whose R4 moves into the weight). Returns the module
    to use: `linear` itself, or a plain `nn.Linear` replacing an `HadamardLinear` (see `replace_child`). `weight`
    (default: the linear's) and `w_scale` (default: min-max times `clip`) let GPTQ hand over its result."""
    had_k = getattr(linear, "had_k", None)
    weight = IntxLinearWeight.from_float(
        (linear.weight if weight is None else weight).detach(),
        w_bits=w_bits,
        a_bits=a_bits,
        act_mode=act_mode if a_bits < 16 else "none",
        act_scale=act_scale,
        had_k=had_k,
        clip=clip,
        act_clip=act_clip,
        w_scale=w_scale,
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
