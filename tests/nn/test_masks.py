"""HF's masks for a PrefixQuant model ("pq_ao"): None where the mask would only say "causal from the cache position",
HF's SDPA mask otherwise; quantized models build their masks that way whatever attention they were loaded with."""

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

import pq_ao
from pq_ao import prefixquant_w4a4
from pq_ao.nn.masks import NAME, prefix_attention_mask

SMALL = dict(n_samples=8, seqlen=128, grid_samples=1, grid_seqlen=128)


def _kw(**over):
    kw = dict(batch_size=2, q_length=5, kv_length=9, q_offset=4, kv_offset=0, mask_function=causal_mask_function,
              attention_mask=None, allow_is_causal_skip=False, dtype=torch.float32, config=None, use_vmap=False,
              device="cpu")  # fmt: skip
    kw.update(over)
    return kw


def test_plain_causal_gives_none():
    assert prefix_attention_mask(**_kw()) is None
    assert prefix_attention_mask(**_kw(q_length=1, q_offset=8)) is None


def test_padding_windows_and_key_offsets_get_hfs_sdpa_mask():
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :2] = False
    for kw in (_kw(attention_mask=pad), _kw(mask_function=sliding_window_causal_mask_function(3)), _kw(kv_offset=2)):
        got, want = prefix_attention_mask(**kw), sdpa_mask(**kw)
        assert got is not None and got.dtype == torch.bool and torch.equal(got, want)


def _quantized(attn_implementation):
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    model.config._attn_implementation = attn_implementation
    pq_ao.quantize_(model, prefixquant_w4a4(**SMALL), tokenizer=tok)
    return model


def test_quantized_models_use_the_pq_ao_masks_whatever_they_were_loaded_with():
    """A model loaded for FlexAttention would hand PrefixAttention a BlockMask: after quantize_ it builds pq_ao's
    masks, and a padded batch gives what the SDPA-loaded model gives."""
    sdpa, flex = _quantized("sdpa"), _quantized("flex_attention")
    assert sdpa.config._attn_implementation == NAME and flex.config._attn_implementation == NAME
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = flex(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
