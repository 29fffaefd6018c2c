"""Min-max statistics of every quantizer's input: the initialisation that the grid search scales.

Gathered block by block during calibration (`grid_search.BlockCalibrator`), in the one full-precision run of
block i over the calibration tokens entering it: the outputs of blocks 0..i-1, already quantized, with the prefix
KV installed, so they are the tensors block i's quantizers will read, and prefix rows never enter (the prefix lives
in the KV, not in the activations). No separate full-model pass: the paper's code gathers them on 64 x 512 tokens
of the full-precision model with an EMA that lets the first batch dominate; the grid search rescales them anyway.
Maxima here are true maxima. The same run records the down_proj token maxima (before R4) that show what the prefix
did to the outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def effective_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a linear's weight multiplies: its input, after the online Hadamard for an `HadamardLinear` (R4)."""
    had_k = getattr(linear, "had_k", None)
    if had_k is None:
        return x
    return torch.ops.pq_ao.hadamard_transform(x, had_k)


@dataclass
class ActStats:
    """absmax per (block, site), per KV head of K (post-RoPE, post-R3) and V, and down_proj's token maxima."""

    act: dict[tuple[int, str], float] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    down_token_max: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # pre-R4, [B, T] per chunk

    def observe_site(self, block: int, site: str, x: torch.Tensor, effective: torch.Tensor) -> None:
        """One chunk of a site's input `x` and of what its weight multiplies (`effective_input`)."""
        key = (block, site)
        self.act[key] = max(self.act.get(key, 0.0), effective.detach().abs().amax().item())
        if site == "down":
            self.down_token_max.setdefault(block, []).append(x.detach().abs().amax(-1).float().cpu())

    def observe_kv(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One chunk of K and V `[B, H_kv, T, D]`."""
        for store, t in ((self.k, k), (self.v, v)):
            cur = t.detach().abs().float().amax(dim=(0, 2, 3))
            store[block] = torch.maximum(store[block], cur) if block in store else cur

    def down_token_max_tensor(self) -> torch.Tensor:
        """`[n_samples, n_layers, seqlen]`, as `outliers.token_max` returns it."""
        return torch.stack([torch.cat(self.down_token_max[b]) for b in sorted(self.down_token_max)], dim=1)
