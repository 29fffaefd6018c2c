"""`prefix_flex_attention`: FlexAttention with the prefix visible to all and a bool mask over the rest, against an
explicit fp64 softmax; and `PrefixAttention` taking it for masked prefills."""

from __future__ import annotations

import pytest
import torch

from pq_ao.nn import attention as attention_mod
from pq_ao.nn import flex_prefix
from pq_ao.nn.flex_prefix import prefix_flex_attention


def _reference(q, k, v, keep, p, scale):
    """fp64 softmax(Q K^T * scale) V with the first p keys visible to every query and the rest by keep."""
    bsz, heads = q.shape[:2]
    rep = heads // k.shape[1]
    k = k.double().expand(bsz, -1, -1, -1).repeat_interleave(rep, 1)
    v = v.double().expand(bsz, -1, -1, -1).repeat_interleave(rep, 1)
    full = torch.cat([torch.ones(bsz, q.shape[2], p, dtype=torch.bool), keep.expand(bsz, -1, -1)], -1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~full[:, None], float("-inf"))
    out = torch.softmax(s, -1) @ v
    return out.masked_fill(~full.any(-1)[:, None, :, None], 0.0)  # a query seeing no key (padding, no prefix): 0


def _case(seed, bsz, heads, kv_heads, t, slots, d, p):
    """Random q/k/v and a slot mask of the kinds a model passes: causal from a per-row start (chunked prefill),
    left padding on row 1, and a sliding window on the last row."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, t, d, generator=gen)
    k = torch.randn(bsz, kv_heads, p + slots, d, generator=gen) * 2
    v = torch.randn(bsz, kv_heads, p + slots, d, generator=gen)
    start = torch.randint(0, slots - t + 1, (bsz,), generator=gen)
    pos = start[:, None] + torch.arange(t)
    j = torch.arange(slots)[None, None, :]
    keep = j <= pos[:, :, None]
    if bsz > 1:
        keep[1, :, : int(start[1]) + 2] = False  # padding: the row's first slots hidden from every query
    keep[-1] &= j[0] > pos[-1, :, None] - 5  # a window of 5
    return q, k, v, keep


@pytest.mark.parametrize("bsz,heads,kv_heads,t,slots,d,p", [(2, 4, 2, 37, 50, 16, 3), (3, 4, 4, 9, 9, 32, 0),
                                                           (1, 8, 2, 130, 200, 16, 4), (2, 2, 1, 5, 40, 64, 1)])
def test_prefix_flex_attention_matches_reference_eager(bsz, heads, kv_heads, t, slots, d, p):
    q, k, v, keep = _case(bsz * 100 + t, bsz, heads, kv_heads, t, slots, d, p)
    want = _reference(q, k, v, keep, p, 0.3)
    got = prefix_flex_attention(q, k, v, keep, p, 0.3)
    assert got.shape == q.shape
    assert (got.double() - want).abs().max() < 1e-5
    if p == 0:
        assert (want == 0).all(-1).any()  # the case has queries that see nothing: flex gives them zeros


def test_prefix_flex_attention_matches_reference_compiled():
    """The compiled kernel (what CUDA graphs run; inductor's CPU template here), a broadcast mask and prefix K/V."""
    q, k, v, keep = _case(7, 2, 4, 2, 37, 50, 16, 3)
    fn = torch.compile(prefix_flex_attention, fullgraph=True)
    got = fn(q, k, v, keep, 3, 0.25)
    assert (got.double() - _reference(q, k, v, keep, 3, 0.25)).abs().max() < 1e-5
    got1 = fn(q, k[:1], v[:1], keep[:1], 3, 0.25)
    assert (got1.double() - _reference(q, k[:1], v[:1], keep[:1], 3, 0.25)).abs().max() < 1e-5


def test_prefix_flex_attention_rejects_bad_masks():
    q, k, v, keep = _case(1, 2, 4, 2, 8, 12, 16, 2)
    with pytest.raises(ValueError, match="keep must be bool"):
        prefix_flex_attention(q, k, v, keep.float(), 2, 0.25)
    with pytest.raises(ValueError, match="keep must be bool"):
        prefix_flex_attention(q, k, v, keep[:, :, 1:], 2, 0.25)
    with pytest.raises(ValueError, match="H_kv dividing"):
        prefix_flex_attention(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), keep, 2, 0.25)


def test_flex_is_for_compiled_cuda_graphs_only():
    assert not flex_prefix.usable(torch.zeros(1))  # CPU, eager


def test_prefix_attention_takes_flex_for_masked_prefill(monkeypatch):
    """`PrefixAttention._attend` with a bool mask (what a prefill into the int cache passes: every slot, the unwritten
    ones hidden) or none over a longer cache gives the same output through FlexAttention as through SDPA."""
    from tests.nn.test_attention import _attention_with_prefix

    q, k, v, keep = _case(3, 2, 4, 2, 11, 30, 16, 0)
    k, v = k[:, :, :30], v[:, :, :30]
    for p in (0, 3):
        attn = _attention_with_prefix(p)
        for mask in (keep[:, None], None):
            sdpa = attn._attend(q, k, v, mask)
            monkeypatch.setattr(flex_prefix, "usable", lambda q: True)
            flex = attn._attend(q, k, v, mask)
            monkeypatch.undo()
            assert (flex - sdpa).abs().max() < 1e-5, (p, mask is None)
    float_mask = torch.zeros(2, 1, 11, 30).masked_fill(~keep[:, None], float("-inf"))
    assert attention_mod._keep_mask(float_mask, 11, 30, "cpu") is None  # additive masks stay on SDPA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's compiled kernel)")
def test_compiled_prefill_into_the_int_cache_matches_eager_on_cuda(monkeypatch, tiny_w4a4_llama):
    """Compiled on CUDA, a prefill into the int KV cache attends through FlexAttention (eager: SDPA with the slot
    mask materialised), with fused q/k/v and gate/up: the same logits for a plain and a left-padded row."""
    from pq_ao.hf_compat import cache_kwarg
    from pq_ao.nn.kv_cache import QuantizedKVCache

    model = tiny_w4a4_llama.cuda()
    assert model.model.layers[0].self_attn.qkv_proj is not None
    ids = torch.randint(3, 256, (2, 21), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    calls = []
    real = flex_prefix.prefix_flex_attention
    monkeypatch.setattr(flex_prefix, "prefix_flex_attention", lambda *a: calls.append(1) or real(*a))

    def prefill(fn):
        cache = QuantizedKVCache(model, max_cache_len=40, batch_size=2, device="cuda")
        with torch.no_grad():
            return fn(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits

    eager = prefill(model)
    assert not calls
    torch.compiler.reset()
    compiled = prefill(torch.compile(model, fullgraph=True))
    assert calls  # traced through FlexAttention
    for row, start in ((0, 0), (1, 6)):
        e, c = eager[row, start:].float(), compiled[row, start:].float()
        assert ((c - e).norm() / e.norm()) < 2e-2, row
        assert (c.argmax(-1) == e.argmax(-1)).float().mean() > 0.9
