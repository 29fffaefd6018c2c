"""`PrefixAttention`'s prefix buffers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from pq_ao.nn.attention import PrefixAttention


def test_set_prefix_stores_contiguous_copies():
    """The prefix V of a model is a transposed view ([1, P, H, D] -> [1, H, P, D]); the buffers must be contiguous
    (the decode kernel reads them through strides fixed at trace time) and hold the same values."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    attn = PrefixAttention(LlamaAttention(config, layer_idx=0))
    k = torch.randn(1, 3, 2, 16).transpose(1, 2)  # [1, H_kv, P, D], not contiguous
    v = torch.randn(1, 3, 2, 16).transpose(1, 2)
    assert not v.is_contiguous()
    attn.set_prefix(k, v)
    for buf, want in ((attn.prefix_k, k), (attn.prefix_v, v)):
        assert buf.is_contiguous() and torch.equal(buf, want) and buf.data_ptr() != want.data_ptr()
    assert attn.prefix_len == 3
