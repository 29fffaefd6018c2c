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
