"""Quantized linears that read one input, run as one: q/k/v, and gate/up of a gated MLP.

    FusedLinear([q_proj, k_proj, v_proj])(x) == (q_proj(x), k_proj(x), v_proj(x))

The weights are stacked along the output channels (`IntxLinearWeight.concat`), so the input is quantized once and
one GEMM (one GEMV at decode) computes every output; the outputs are views of its result. The linears of a
PrefixQuant site share their input quantizer (one static scale, or one per-token quantization), which is what
makes this exact: each output channel's integer dot product, scales and bias are those of the separate linear, so
the outputs are bitwise the same (on every path whose epilogue does not depend on N; the fp8 path's `_scaled_mm`
is within one rounding of the output dtype either way). The outputs are strided views of one tensor: an elementwise
op on them may take another vectorisation than on a contiguous tensor (CPU eager SiLU differs in the last bit).

Why: at decode every linear is a launch of a few microseconds, and at prefill the k/v projections (N = 1024 on
Llama-3-8B) leave the GPU half idle, and each separate linear re-quantizes the same input. The fusion pass
(`pq_ao.passes.fuse`) installs these modules; `unfuse` gives back linears whose weights are views of the fused one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pq_ao.tensors import IntxLinearWeight
from pq_ao.tensors.intx_weight import swiglu_linear

__all__ = ["FusedLinear", "FusedGatedMLP", "fusable"]


def fusable(linears: list[nn.Module]) -> str | None:
    """None if the linears can run as one `FusedLinear`, else why not (a sentence)."""
    weights = [getattr(lin, "weight", None) for lin in linears]
    if len(linears) < 2 or not all(isinstance(lin, nn.Linear) for lin in linears):
        return "fewer than two nn.Linear modules"
    if not all(isinstance(w, IntxLinearWeight) for w in weights):
        return "not every weight is quantized (IntxLinearWeight)"
    if not all(weights[0].same_input_quantization(w) for w in weights[1:]):
        return "their inputs are quantized differently (bits, mode, online Hadamard or activation range)"
    biases = [lin.bias for lin in linears]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return "some have a bias and some do not"
    if biases[0] is not None and len({(b.dtype, b.device) for b in biases}) > 1:
        return "their biases differ in dtype or device"
    return None


class FusedLinear(nn.Module):
    """Linears reading one input as one module; `forward` returns their outputs in order (see the module docstring).

    `weight`: the stacked `IntxLinearWeight` `[sum(out_features), in_features]`; `bias`: stacked or None;
    `out_features`: each linear's width; `names`: what the linears were called (for `unfuse` and reports)."""

    def __init__(self, weight: IntxLinearWeight, bias: torch.Tensor | None, out_features: tuple[int, ...],
                 names: tuple[str, ...]):  # fmt: skip
        super().__init__()
        if sum(out_features) != weight.shape[0] or len(out_features) != len(names):
            raise ValueError(f"out_features {out_features} must add up to the weight's {weight.shape[0]} rows and "
                             f"match names {names}")  # fmt: skip
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features = weight.shape[1]
        self.out_features = tuple(out_features)
        self.names = tuple(names)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], names: list[str]) -> "FusedLinear":
        reason = fusable(linears)
        if reason is not None:
            raise ValueError(f"cannot fuse {names}: {reason}")
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        weight = IntxLinearWeight.concat([lin.weight for lin in linears])
        return cls(weight, bias, tuple(lin.out_features for lin in linears), tuple(names))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.out_features, dim=-1)

    def unfuse(self) -> list[nn.Linear]:
        """The separate linears again; their weights and biases are views of this module's."""
        out, start = [], 0
        for n in self.out_features:
            lin = nn.Linear(self.in_features, n, bias=self.bias is not None, device="meta")
            lin.weight = nn.Parameter(self.weight.out_rows(start, n), requires_grad=False)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias.detach().narrow(0, start, n), requires_grad=False)
            out.append(lin)
            start += n
        return out

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}={n}" for name, n in zip(self.names, self.out_features))
        return f"in_features={self.in_features}, {parts}, bias={self.bias is not None}"


class FusedGatedMLP(nn.Module):
    """A gated MLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, with gate and up as one `FusedLinear`; with SiLU
    and a quantized down_proj, the gating goes into down_proj's input quantizer (`swiglu_linear`).

    Built by `pq_ao.passes.fuse` from an HF MLP module (`original`, kept unregistered so that `unfuse` can give it
    back with its gate/up restored); `down_proj` and `act_fn` are the original's own modules."""

    def __init__(self, original: nn.Module, gate_up_proj: FusedLinear):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = original.down_proj
        self.act_fn = original.act_fn
        object.__setattr__(self, "_original", original)  # not a submodule: its weights are the ones above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj
        if self._gating_fusable():
            gate_up = F.linear(x, fused.weight, fused.bias)  # [..., 2 x intermediate], gate first
            return swiglu_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
        gate, up = fused(x)
        return self.down_proj(self.act_fn(gate) * up)

    def _gating_fusable(self) -> bool:
        """SiLU gating into a quantized down_proj: `silu(gate) * up` goes to down_proj's kernel as the joined
        projection (`swiglu_linear`), never written out on CUDA. A trace-time constant."""
        silu = isinstance(self.act_fn, nn.SiLU) or type(self.act_fn).__name__ == "SiLUActivation"
        widths = self.gate_up_proj.out_features
        return (silu and isinstance(getattr(self.down_proj, "weight", None), IntxLinearWeight)
                and len(widths) == 2 and widths[0] == widths[1] == self.down_proj.weight.shape[1])  # fmt: skip

    def unfuse(self) -> nn.Module:
        """The original MLP module with gate_proj / up_proj whose weights are views of the fused one's."""
        mlp = self._original
        mlp.gate_proj, mlp.up_proj = self.gate_up_proj.unfuse()
        mlp.down_proj, mlp.act_fn = self.down_proj, self.act_fn
        return mlp
