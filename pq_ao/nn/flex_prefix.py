"""Masked prefix attention through FlexAttention: the prefix keys visible to every query, the rest by a bool mask.

    out = softmax(Q [K_prefix; K]^T * scale + bias) [V_prefix; V],   bias = 0 where visible, -inf elsewhere

where the first `prefix_len` keys are visible to every query and key `prefix_len + j` to query i iff
`keep[b, i, j]`. This is what `PrefixAttention` computes whenever a mask is involved (a prefill into the int KV
cache, whose slots beyond the new tokens are masked; padded batches; chunked prefill). SDPA needs that mask
materialised over every slot, which sends it to its slower masked kernels and expands the KV heads; FlexAttention
builds a block mask from `keep` (blocks wholly visible or wholly hidden skip the per-element test) and runs a
flash-style kernel with GQA, so the prefill costs close to plain causal attention whatever the mask holds.

Invariant: for every `keep` (padding, sliding windows, arbitrary), the result equals the SDPA reference with the
materialised mask up to the summation order of the softmax.

Used under `torch.compile` on CUDA only (`usable`): eager FlexAttention runs an unfused reference, and inductor's
CPU template is not needed there (CPU prefill keeps SDPA).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

__all__ = ["prefix_flex_attention", "usable"]


def usable(q: torch.Tensor) -> bool:
    """Whether `PrefixAttention` takes this path: CUDA tensors inside a graph that torch.compile / torch.export
    traces (a trace-time constant, so no graph break and no guard on data)."""
    return q.is_cuda and torch.compiler.is_compiling()


def prefix_flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, prefix_len: int, scale: float,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """q `[B, H, T, D]`; k, v `[B, H_kv, P + S, D]` with the `prefix_len = P` prefix keys in front; keep bool
    `[B or 1, T, S]` (True = key visible to the query). `kernel_options` go to FlexAttention (tile sizes).
    Returns `[B, H, T, D]`."""
    bsz, n_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if k.shape != v.shape or k.shape[0] not in (1, bsz) or n_heads % k.shape[1]:
        raise ValueError(f"k and v must be [B, H_kv, P + S, D] with H_kv dividing {n_heads}, got {list(k.shape)}, "
                         f"{list(v.shape)}")  # fmt: skip
    if keep.dtype != torch.bool or keep.dim() != 3 or keep.shape[1] != q_len or keep.shape[2] != kv_len - prefix_len:
        raise ValueError(f"keep must be bool [B, {q_len}, {kv_len - prefix_len}], got {keep.dtype} {list(keep.shape)}")
    keep = keep.expand(bsz, -1, -1)
    k, v = k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)

    def mask_mod(b, h, q_idx, kv_idx):
        # torch.where, not `|`: inductor's CPU code generator mixes mask types on the latter (torch 2.13)
        return torch.where(kv_idx < prefix_len, True, keep[b, q_idx, (kv_idx - prefix_len).clamp(min=0)])

    block_mask = create_block_mask(mask_mod, bsz, None, q_len, kv_len, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != n_heads,
                          kernel_options=kernel_options)
