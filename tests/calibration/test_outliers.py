import pytest
import torch

from pq_ao.calibration.outliers import (
    FIRST_POSITION,
    find_prefix,
    select_prefix,
    token_max,
    token_max_summary,
    top_median_ratio,
)
from pq_ao.models import load_model

BOS = 1


def test_select_prefix_follows_the_paper_rule():
    n, layers, seqlen = 10, 3, 32
    g = torch.Generator().manual_seed(0)
    tmax = torch.rand(n, layers, seqlen, generator=g) + 1.0
    tokens = torch.randint(3, 100, (n, seqlen), generator=g)
    tmax[:, 1, 0] = 1000.0  # position 0: an outlier in every sample, but never counted as a token id
    for s in range(n):  # token 7 at position 5 is an outlier in layers 1 and 2; token 9 only in half the samples
        tokens[s, 5] = 7
        tmax[s, 1:, 5] = 500.0
        if s % 2 == 0:
            tokens[s, 9] = 9
            tmax[s, 2, 9] = 500.0
    prefix, o, mean_counts, counter = select_prefix(tmax, tokens, eta=64, max_len=8, bos_id=BOS)
    # layer 1: 2 outliers per sample (pos 0 and 5); layer 2: 1 + 0.5 -> o = ceil(2) = 2
    assert mean_counts == pytest.approx([0.0, 2.0, 1.5])
    assert o == 2
    assert counter[7] == 2 * n and counter[9] == n // 2
    assert prefix == [7, 9, BOS]  # most frequent first, BOS last


def test_select_prefix_without_outliers_is_bos_only_and_respects_max_len():
    tmax = torch.ones(4, 2, 16)
    tokens = torch.randint(3, 50, (4, 16))
    assert select_prefix(tmax, tokens, 64, 8, BOS)[0] == [BOS]
    tmax[:, 0, 3:8] = 1000.0
    tokens[:, 3:8] = torch.arange(20, 25)
    prefix = select_prefix(tmax, tokens, 64, 3, BOS)[0]
    assert len(prefix) == 3 and prefix[-1] == BOS


def test_token_max_summary_names_the_top_tokens_and_position_0():
    """Per layer: top-1 / top-2 / median averaged over samples; the tokens ranking first or second grouped by id,
    position 0 a group of its own whatever its id."""
    tmax = torch.ones(2, 2, 6)
    tmax[:, :, 1:] = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])  # median 3 (lower median of 6 values: 1,2,3,4,5,6)
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 15]])
    tmax[0, 1, 0], tmax[1, 1, 0] = 100.0, 50.0  # layer 1: position 0 is the top, ids 10 and 20
    tmax[1, 1, 5] = 40.0  # token 15 (position 5) second in sample 1, as in sample 0 (its 6.0)
    out = token_max_summary(tmax, tokens, decode=lambda i: f"t{i}")
    assert out[0]["top1"] == 6.0 and out[0]["top2"] == 5.0 and out[0]["median"] == 3.0
    assert out[0]["tokens"] == [
        {"token": "t15", "token_ids": [15], "positions": [5], "count": 2, "max": 6.0},
        {"token": "t14", "token_ids": [14], "positions": [4], "count": 1, "max": 5.0},
        {"token": "t24", "token_ids": [24], "positions": [4], "count": 1, "max": 5.0},
    ]  # ties in count go to the larger value, then stay in the order met
    assert out[1]["top1"] == 75.0 and out[1]["top2"] == 23.0
    assert out[1]["tokens"][:2] == [
        {"token": FIRST_POSITION, "token_ids": [10, 20], "positions": [0], "count": 2, "max": 100.0},
        {"token": "t15", "token_ids": [15], "positions": [5], "count": 2, "max": 40.0},
    ]
    with pytest.raises(ValueError, match="do not match"):
        token_max_summary(tmax, tokens[:, :3], decode=str)


def _planted_model(token: int, channel: int = 5):
    """stories260K where `token` drives a massive down_proj input in layer 0 (and nothing else does)."""
    model, tok = load_model("stories260k", dtype=torch.float32)
    emb = model.model.embed_tokens.weight.data
    model.model.embed_tokens.weight = torch.nn.Parameter(emb.clone())  # untie before editing
    emb = model.model.embed_tokens.weight.data
    emb[:, channel] = 0.0
    emb[token, channel] = 50.0
    layer = model.model.layers[0]
    layer.self_attn.v_proj.weight.data[:, channel] = 0.0  # keep attention from spreading the channel
    layer.self_attn.k_proj.weight.data[:, channel] = 0.0
    layer.self_attn.q_proj.weight.data[:, channel] = 0.0
    layer.mlp.gate_proj.weight.data[0, channel] = 5.0
    layer.mlp.up_proj.weight.data[0, channel] = 5.0
    return model, tok


def test_find_prefix_on_a_planted_outlier_token():
    planted = 13
    model, tok = _planted_model(planted)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 512, (16, 64), generator=g)
    tokens[tokens == planted] = 14
    tokens[:, 10] = planted  # once per sample, never at position 0
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    report = find_prefix(model, downs, tokens, tok, eta=64, max_len=8)
    assert report.prefix_ids[0] == planted
    assert report.prefix_ids[-1] == tok.bos_token_id
    assert report.ratio_before[0] > 64
    tmax = token_max(model, downs, tokens)
    assert tmax[:, 0, 10].min() > 64 * tmax[:, 0].median()
    assert top_median_ratio(tmax)[0] == pytest.approx(report.ratio_before[0])
