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


def _attention_with_prefix(p: int, heads: int = 4, kv_heads: int = 2, d: int = 16) -> PrefixAttention:
    config = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d)
    attn = PrefixAttention(LlamaAttention(config, layer_idx=0))
    if p:
        gen = torch.Generator().manual_seed(p)
        attn.set_prefix(torch.randn(1, kv_heads, p, d, generator=gen) * 3, torch.randn(1, kv_heads, p, d, generator=gen))
    return attn


def _masked_reference(attn, q, k, v):
    """softmax over [prefix; k] with the prefix visible to all and k causal, as an explicit fp64 computation."""
    p, rep = attn.prefix_len, attn.n_heads // attn.n_kv_heads
    if p:
        k = torch.cat([attn.prefix_k.expand(q.shape[0], -1, -1, -1), k], 2)
        v = torch.cat([attn.prefix_v.expand(q.shape[0], -1, -1, -1), v], 2)
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    t, kv = q.shape[2], k.shape[2]
    keep = torch.ones(t, kv, dtype=torch.bool).tril(kv - t)
    s = (q.double() @ k.transpose(-1, -2) * attn.scaling).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_causal_with_prefix_is_prefix_plus_causal_attention():
    """The fast prefill path (P zero queries and the P prefix keys in front, SDPA's square causal mask) computes
    the prefix-visible causal attention, with and without GQA and a prefix."""
    gen = torch.Generator().manual_seed(0)
    for p, heads, kv_heads in ((3, 4, 2), (1, 4, 4), (0, 4, 2), (2, 1, 1)):
        attn = _attention_with_prefix(p, heads, kv_heads)
        q = torch.randn(2, heads, 9, 16, generator=gen)
        k, v = torch.randn(2, kv_heads, 9, 16, generator=gen), torch.randn(2, kv_heads, 9, 16, generator=gen)
        got = attn._causal_with_prefix(q, k, v)
        want = _masked_reference(attn, q, k, v)
        assert got.shape == (2, heads, 9, 16)
        assert (got.double() - want).abs().max() < 1e-5, (p, heads, kv_heads)


def test_extend_mask_adds_visible_prefix_columns():
    from pq_ao.nn.attention import _extend_mask

    assert _extend_mask(None, 5, 5, 0, "cpu") is None  # plain causal: SDPA's is_causal
    assert _extend_mask(None, 1, 9, 0, "cpu") is None  # one query sees everything
    m = _extend_mask(None, 3, 5, 2, "cpu")  # causal over 5 keys, 3 queries at the end, 2 prefix columns
    want = torch.cat([torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool).tril(2)], 1)
    assert torch.equal(m[0, 0], want)
    additive = torch.zeros(1, 1, 3, 5)
    additive[..., -1] = float("-inf")
    m = _extend_mask(additive, 3, 5, 2, "cpu")
    assert m.dtype == additive.dtype and torch.equal(m[..., :2], torch.zeros(1, 1, 3, 2))
    assert torch.equal(m[..., 2:], additive)


def test_slot_mask_from_start_or_from_hf():
    from pq_ao.nn.attention import _slot_mask

    got = _slot_mask(None, 2, 3, 8, torch.tensor(4), "cpu")  # queries at slots 4, 5, 6
    assert got.shape == (2, 3, 8) and torch.equal(got[0].sum(-1), torch.tensor([5, 6, 7]))
    hf = torch.zeros(2, 1, 3, 10)
    hf[1, 0, :, 0] = float("-inf")  # additive: row 1's first slot is padding
    got = _slot_mask(hf, 2, 3, 8, torch.tensor(0), "cpu")
    assert got.shape == (2, 3, 8) and not got[1, :, 0].any() and got[0].all()


def test_prefix_positions_shift_real_tokens():
    from pq_ao.nn.attention import PrefixPositions

    seen = []

    class Rotary(torch.nn.Module):
        def forward(self, x, position_ids):
            seen.append(position_ids)
            return position_ids

    wrapped = PrefixPositions(Rotary(), offset=3)
    wrapped(torch.zeros(1), torch.arange(4)[None])
    assert torch.equal(seen[0], torch.arange(3, 7)[None])


def test_r3_of_q_and_k_in_one_launch_is_two_transforms():
    """`_r3` joins the Q and K heads for one transform launch; each row gets the transform it gets alone."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    attn = PrefixAttention(LlamaAttention(config, layer_idx=0), rotate_qk=True)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(3, 4, 5, 16, generator=gen), torch.randn(3, 2, 5, 16, generator=gen)
    q2, k2 = attn._r3(q, k)
    assert q2.shape == q.shape and k2.shape == k.shape
    assert torch.equal(q2, torch.ops.pq_ao.hadamard_transform(q, attn.r3_had_k))
    assert torch.equal(k2, torch.ops.pq_ao.hadamard_transform(k, attn.r3_had_k))
