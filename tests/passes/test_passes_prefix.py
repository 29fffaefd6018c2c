"""The prefix invariant: a prefixed full-precision model scores x exactly as the plain model scores prefix + x."""

import pytest
import torch

import pq_ao
from pq_ao.calibration.sites import block_sites
from pq_ao.hf_compat import cache_kwarg, output_cache
from pq_ao.passes import find_structure, fold_norms, rotate_model
from pq_ao.passes.prefix import install_prefix, remove_prefix


@pytest.fixture(scope="module")
def rotated():
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    structure = fold_norms(model, find_structure(model))
    rotate_model(model, structure, seed=3)
    return model, tok, [b.attn for b in block_sites(model, structure)]


@pytest.mark.parametrize("prefix", [[1], [13, 29, 1]])
def test_prefixed_logits_equal_plain_logits_on_prefix_plus_input(rotated, prefix):
    model, _, attns = rotated
    x = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(len(prefix)))
    with torch.no_grad():
        full = model(input_ids=torch.cat([torch.tensor([prefix] * 2), x], 1), use_cache=False).logits
        install_prefix(model, attns, prefix)
        try:
            assert all(a.prefix_len == len(prefix) for a in attns)
            got = model(input_ids=x, use_cache=False).logits
            # and through the HF cache, token by token after a 30-token prompt
            out = model(input_ids=x[:, :30], use_cache=True)
            cache, steps = output_cache(out), [out.logits[:, -1]]
            for t in range(30, 39):
                out = model(input_ids=x[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache})
                steps.append(out.logits[:, -1])
        finally:
            remove_prefix(model, attns)
    want = full[:, len(prefix) :]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), want[:, 29:39], rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 39  # the HF cache never holds the prefix


def test_padded_batch_sees_the_prefix(rotated):
    """Left padding: the padded row scores its real tokens like the unpadded row."""
    model, _, attns = rotated
    x = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(9))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    install_prefix(model, attns, [1])
    try:
        with torch.no_grad():
            ref = model(input_ids=x, use_cache=False).logits
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            got = model(input_ids=padded, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, 5:]
    finally:
        remove_prefix(model, attns)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_left_padding_needs_no_position_ids(rotated):
    """A plain forward of a left-padded batch with only a mask (what batched scoring does): each row gets the
    positions it has alone, so the padded row scores like the unpadded one (issue 18; before: the padding opened a
    gap between the prefix and the text). Right padding, and a continuation through the cache, too."""
    model, _, attns = rotated
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(3, 512, (1, 20), generator=gen)
    other = torch.randint(3, 512, (1, 25), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1), other])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    install_prefix(model, attns, [13, 29, 1])
    try:
        with torch.no_grad():
            alone = model(input_ids=x, use_cache=False).logits
            other_alone = model(input_ids=other, use_cache=False).logits
            got = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
            right = model(input_ids=torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1),
                          attention_mask=torch.cat([torch.ones(1, 20), torch.zeros(1, 5)], 1).long(),
                          use_cache=False).logits  # fmt: skip
            first = model(input_ids=batch[:, :15], attention_mask=mask[:, :15], use_cache=True)
            rest = model(input_ids=batch[:, 15:], attention_mask=mask, use_cache=True,
                         **{cache_kwarg(model): output_cache(first)}).logits  # fmt: skip
    finally:
        remove_prefix(model, attns)
    torch.testing.assert_close(got[:1, 5:], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1:], other_alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(right[:, :20], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest[:1], got[:1, 15:], rtol=1e-4, atol=1e-4)
