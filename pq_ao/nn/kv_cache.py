"""`QuantizedKVCache`: an HF static cache whose layers hold K and V as int4 (packed) or int8 codes.

Per layer, `keys` / `values` are `[B, H_kv, max_cache_len, D // 2]` uint8 (4-bit codes packed along D as
`quant_math.pack_int4` packs them) or `[B, H_kv, max_cache_len, D]` int8; slot t holds real token t. The prefix
never enters the cache: it lives in the attention modules as constant full-precision K/V. The scales are the
attention modules' static K/V scales, so `code * scale[h]` is exactly the fake-quantized value the model computes
with any other HF cache: with this cache the model gives the same logits (up to attention summation order) while
the cache takes 1/4 of the bytes of a bf16 cache (4-bit) or 1/2 (8-bit).

Only `PrefixAttention` writes to it (with codes: `layer.update` refuses floats); the layers are HF `StaticLayer`s
(fixed shapes, in-place `index_copy_`, a tensor length), so `generate`, `torch.compile` and `torch.export` treat
it as they treat HF's `StaticCache`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer


class QuantizedKVLayer(StaticLayer):
    """One layer's code buffers; `update` takes and returns codes.

    `holds_tokens` mirrors on the host whether any token was written since the layer was made or `reset()` (the
    length itself is a device tensor, read by no one on the host): a prefill into an empty cache attends over the new
    tokens alone (`PrefixAttention`). torch.compile guards on it, so an empty and a filled cache get their own
    graphs. Unknown (a cache over given buffers, `QuantizedKVCache.over`) counts as holding tokens. Write the cache
    through `update` and `reset` only: setting `cumulative_length` by hand leaves the mirror stale."""

    def __init__(self, max_cache_len: int, bits: int):
        super().__init__(max_cache_len=max_cache_len)
        self.bits = bits
        self.holds_tokens = False

    def update(self, key_codes: torch.Tensor, value_codes: torch.Tensor, *args, **kwargs):
        want = torch.uint8 if self.bits == 4 else torch.int8
        if key_codes.dtype != want or value_codes.dtype != want:
            raise TypeError(
                f"QuantizedKVCache ({self.bits}-bit) stores {want} codes, got {key_codes.dtype}/{value_codes.dtype}: "
                "only a PrefixQuant model with static K/V quantizers can use it (other attention modules write floats)"
            )
        out = super().update(key_codes, value_codes, *args, **kwargs)
        if not self.holds_tokens:  # (read, not written, once set: no side effect in a decode graph)
            self.holds_tokens = True
        return out

    def reset(self) -> None:
        super().reset()
        self.holds_tokens = False


def _quantized_attentions(model: nn.Module) -> list:
    from pq_ao.nn.attention import PrefixAttention

    attns = sorted((m for m in model.modules() if isinstance(m, PrefixAttention)), key=lambda a: a.layer_idx)
    if not attns:
        raise ValueError("QuantizedKVCache needs a PrefixQuant model (pq_ao.quantize_): no PrefixAttention found")
    for a in attns:
        if a.k_quant is None or a.v_quant is None or a.k_quant.mode != "static" or a.v_quant.mode != "static":
            raise ValueError(
                f"layer {a.layer_idx}: QuantizedKVCache stores codes with static K/V scales; this model's K/V are "
                f"{'not quantized' if a.k_quant is None else a.k_quant.mode + ' quantized'}: use an HF cache instead"
            )
    return attns


class QuantizedKVCache(Cache):
    """Static int4/int8 KV cache for a PrefixQuant model.

    `QuantizedKVCache(model, max_cache_len)`; pass it as the model's cache (`model.generate(ids, cache=...)`, or
    `past_key_values=` before transformers 5.24). Buffers are allocated at the first forward, or at once when
    `batch_size` is given (needed for torch.export).
    """

    def __init__(self, model: nn.Module, max_cache_len: int, batch_size: int | None = None, device=None):
        attns = _quantized_attentions(model)
        self.bits = attns[0].k_quant.bits
        self.n_kv_heads, self.head_dim = attns[0].n_kv_heads, attns[0].head_dim
        super().__init__(layers=[QuantizedKVLayer(max_cache_len, a.k_quant.bits) for a in attns])
        if batch_size is not None:
            device = device if device is not None else attns[0].k_quant.scale.device
            for layer in self.layers:
                codes = self.empty_codes(batch_size, 1, device)
                layer.lazy_initialization(codes, codes)

    @classmethod
    def over(cls, model: nn.Module, kv: list[torch.Tensor], length: torch.Tensor) -> "QuantizedKVCache":
        """A cache whose layers are the given buffers `kv = [k_0, v_0, k_1, v_1, ...]` (written in place) holding
        `length` (int64 `[1]`) tokens: the form torch.export takes the cache in (`pq_ao.export`)."""
        cache = cls(model, max_cache_len=kv[0].shape[2])
        if len(kv) != 2 * len(cache.layers):
            raise ValueError(f"expected {2 * len(cache.layers)} cache buffers (K and V per layer), got {len(kv)}")
        want = cache.empty_codes(kv[0].shape[0], kv[0].shape[2], "meta")
        for i, layer in enumerate(cache.layers):
            k, v = kv[2 * i], kv[2 * i + 1]
            for t in (k, v):
                if t.dtype != want.dtype or t.shape != want.shape:
                    raise ValueError(f"layer {i}: cache buffer must be {want.dtype} {list(want.shape)}, "
                                     f"got {t.dtype} {list(t.shape)}")  # fmt: skip
            layer.keys, layer.values = k, v
            layer.device, layer.batch_size, layer.num_heads = k.device, k.shape[0], k.shape[1]
            layer.k_head_dim = layer.v_head_dim = k.shape[3]
            layer.cumulative_length = length.reshape(()).clone()
            layer.is_initialized = True
            layer.holds_tokens = True  # unknown: the general path
        return cache

    def empty_codes(self, batch_size: int, length: int, device) -> torch.Tensor:
        """Zero codes for `length` slots, `[B, H_kv, length, D // 2 | D]`."""
        width = self.head_dim // 2 if self.bits == 4 else self.head_dim
        dtype = torch.uint8 if self.bits == 4 else torch.int8
        return torch.zeros(batch_size, self.n_kv_heads, length, width, dtype=dtype, device=device)

    def nbytes(self) -> int:
        """Bytes held by the code buffers (0 before they are allocated)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))  # fmt: skip

    def bf16_nbytes(self) -> int:
        """What a bf16 cache of the same shape would hold."""
        per_slot = 2 * self.n_kv_heads * self.head_dim * 2
        return sum(layer.batch_size * layer.max_cache_len * per_slot for layer in self.layers if layer.is_initialized)
