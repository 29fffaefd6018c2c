"""`calibration/stats.py`: the min-max statistics are true maxima over every chunk, per site and per KV head."""

from __future__ import annotations

import torch
from torch import nn

from pq_ao.calibration.stats import ActStats, effective_input
from pq_ao.hadamard import hadamard_transform
from pq_ao.nn.hadamard_linear import HadamardLinear


def test_effective_input_applies_the_online_hadamard_only_for_r4():
    x = torch.randn(3, 5, 24)
    assert effective_input(nn.Linear(24, 8), x) is x
    had = HadamardLinear.from_linear(nn.Linear(24, 8))
    torch.testing.assert_close(effective_input(had, x), hadamard_transform(x, had.had_k), rtol=1e-6, atol=1e-6)


def test_site_maxima_span_every_chunk():
    stats = ActStats()
    a, b = torch.randn(2, 7, 16), torch.randn(2, 7, 16) * 3
    for chunk in (a, b):
        stats.observe_site(0, "qkv", chunk, chunk * 2)  # the effective input is what counts
    assert stats.act[(0, "qkv")] == float((torch.cat([a, b]) * 2).abs().max())
    assert (0, "o") not in stats.act and 0 not in stats.down_token_max  # only the down site records token maxima


def test_down_token_maxima_and_their_tensor():
    stats = ActStats()
    for block in (0, 1):
        for _ in range(2):  # two chunks of 3 samples
            x = torch.randn(3, 11, 40)
            stats.observe_site(block, "down", x, x)
    t = stats.down_token_max_tensor()
    assert t.shape == (6, 2, 11)  # [samples, layers, tokens], as outliers.token_max returns it
    assert torch.equal(t[:3, 1], stats.down_token_max[1][0])


def test_kv_maxima_are_per_head_over_batch_tokens_and_dims():
    stats = ActStats()
    k1, k2 = torch.randn(2, 3, 9, 8), torch.randn(1, 3, 4, 8)
    k2[0, 1, 2, 5] = 100.0  # head 1 only
    for k in (k1, k2):
        stats.observe_kv(4, k, -k)
    want = torch.maximum(k1.abs().amax((0, 2, 3)), k2.abs().amax((0, 2, 3)))
    assert torch.equal(stats.k[4], want) and torch.equal(stats.v[4], want)
    assert stats.k[4][1] == 100.0 and stats.k[4].shape == (3,)
