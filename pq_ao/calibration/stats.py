"""Activation statistics for the min-max initialisation of every quantizer.

Gathered on the full-precision rotated model with the prefix installed, so prefix rows never enter (the prefix
lives in the KV, not in the activations). The same pass records the down_proj token maxima (before R4) that
show what the prefix did to the outliers. Maxima are true maxima over all calibration tokens (not the paper
code's EMA, which lets the first batch dominate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pq_ao.calibration.prefix_kv import decoder
from pq_ao.calibration.sites import SITES, BlockSites


def effective_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a linear's weight multiplies: its input, after the online Hadamard for an `HadamardLinear` (R4)."""
    had_k = getattr(linear, "had_k", None)
    if had_k is None:
        return x
    return torch.ops.pq_ao.hadamard_transform(x, had_k)


@dataclass
class ActStats:
    """absmax per (block, site), and per KV head of K (post-RoPE, post-R3) and V."""

    act: dict[tuple[int, str], float] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    down_token_max: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # pre-R4, [B, T] per batch

    def down_token_max_tensor(self) -> torch.Tensor:
        """`[n_samples, n_layers, seqlen]`, as `outliers.token_max` returns it."""
        return torch.stack([torch.cat(self.down_token_max[b]) for b in sorted(self.down_token_max)], dim=1)

    def _max(self, key, value: float) -> None:
        self.act[key] = max(self.act.get(key, 0.0), value)


def _kv_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().float().amax(dim=(0, 2, 3))  # [B, H_kv, T, D] -> [H_kv]


@torch.no_grad()
def collect_stats(model: nn.Module, blocks: list[BlockSites], tokens: torch.Tensor, batch_size: int = 8) -> ActStats:
    stats = ActStats()
    handles = []

    def site_hook(b: int, site: str, linear: nn.Module):
        def fn(_mod, args):
            stats._max((b, site), effective_input(linear, args[0]).abs().amax().item())
            if site == "down":
                stats.down_token_max.setdefault(b, []).append(args[0].detach().abs().amax(-1).float())

        return fn

    def kv_observer(b: int):
        def fn(_mod, q, k, v):
            for store, t in ((stats.k, k), (stats.v, v)):
                cur = _kv_absmax(t)
                store[b] = torch.maximum(store[b], cur) if b in store else cur

        return fn

    saved = []
    for bs in blocks:
        for site in SITES:
            first = bs.linears(site)[0]
            handles.append(first.register_forward_pre_hook(site_hook(bs.index, site, first)))
        saved.append(bs.attn.observer)
        bs.attn.observer = kv_observer(bs.index)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="statistics", leave=False):
            decoder(model)(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for bs, obs in zip(blocks, saved):
            bs.attn.observer = obs
    return stats
