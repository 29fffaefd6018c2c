"""The attention masks HF builds for a PrefixQuant model, under its own attention implementation name, "pq_ao".

`PrefixAttention` reads three kinds of mask: None (no padding: each query sees the prefix and the cache up to its own
position), a bool keep mask `[B, 1, T, S]`, or an additive float one. HF's "sdpa" mask function returns None only
when it proves on the host that plain causal attention is exact; under torch.compile and torch.export it never can,
and it materialises the causal mask over every slot of a static cache, so the attention cannot tell a plain prefill
from a padded one. Registered as "pq_ao", `prefix_attention_mask` returns None whenever the mask would say no more
than "causal from the cache position" (no padding mask, the plain causal mask function, no sliding window or key
offset) and HF's SDPA mask otherwise; `PrefixAttention` then picks its kernels from what it knows (causal SDPA for a
prefill into an empty cache, the int cache's decode kernel with the causal bound computed in the graph).

The name also keeps HF from handing `PrefixAttention` a mask it does not read: a model loaded with
`attn_implementation="flash_attention_2"` or `"flex_attention"` would pass a 2D padding mask or a BlockMask.

Invariant: for every input, `PrefixAttention` computes the same with this mask as with HF's "sdpa" mask.
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

__all__ = ["NAME", "prefix_attention_mask", "use_prefix_masks"]

NAME = "pq_ao"


def prefix_attention_mask(*args, **kwargs):
    """HF's SDPA mask (`sdpa_mask`, same arguments), or None when it would only encode causality from the cache
    position: no padding mask, the plain causal mask function, no sliding window, key offset 0."""
    if (not args and kwargs.get("attention_mask") is None and kwargs.get("mask_function") is causal_mask_function
            and kwargs.get("local_size") is None and isinstance(kwargs.get("kv_offset", 0), int)
            and kwargs.get("kv_offset", 0) == 0):  # fmt: skip
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make "pq_ao" a known HF attention implementation: its masks from `prefix_attention_mask`, and SDPA as the
    attention function of any module `PrefixAttention` did not replace. Idempotent."""
    AttentionInterface.register(NAME, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, prefix_attention_mask)


def use_prefix_masks(model: nn.Module) -> None:
    """Point `model`'s HF config at the "pq_ao" implementation (its attention modules are `PrefixAttention`)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    register()
    config._attn_implementation = NAME
