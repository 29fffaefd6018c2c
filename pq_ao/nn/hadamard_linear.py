"""`HadamardLinear`: an nn.Linear whose input first goes through the online Hadamard transform (R4).

    y = F.linear(hadamard_transform(x, had_k), weight, bias)

`rotate.py` builds it from a down_proj with `weight = hadamard_transform(W, had_k)` (row-wise, i.e. W H^T), so
y = W x + b exactly. The state dict is nn.Linear's plus the `had_k` buffer. The transform is the registered op
`pq_ao::hadamard_transform` (CPU reference / CUDA Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pq_ao.hadamard import compute_dtype, hadamard_factor, hadamard_transform
from pq_ao.kernels import ops


class HadamardLinear(nn.Linear):
    """nn.Linear with an online Hadamard of size `in_features = K * 2**m` on its input; `had_k` is the K x K
    factor (`pq_ao.hadamard.hadamard_factor(in_features)[1]` by default), a float32 buffer."""

    def __init__(self, in_features, out_features, bias=True, had_k=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        had_k = hadamard_factor(in_features)[1] if had_k is None else had_k
        self.register_buffer("had_k", had_k.to(device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, had_k: torch.Tensor | None = None) -> "HadamardLinear":
        """The same function as `linear`: weight <- hadamard_transform(weight, had_k) (fp32, fp64 for fp64)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, had_k, w.device, w.dtype)
        with torch.no_grad():
            dt = compute_dtype(w.dtype)
            new.weight.copy_(hadamard_transform(w.detach().to(dt), new.had_k).to(w.dtype))
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.hadamard_transform(x, self.had_k), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, K={self.had_k.shape[-1]}"
