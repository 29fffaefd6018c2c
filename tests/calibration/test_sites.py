"""`calibration/sites.py`: a block's quantization sites are the modules the structure pass named."""

from __future__ import annotations

import copy

import pytest

from pq_ao.calibration.sites import SITES, block_sites
from pq_ao.passes import find_structure, fold_norms, rotate_model


def test_sites_resolve_to_the_blocks_modules(stories):
    model = copy.deepcopy(stories[0])
    s = fold_norms(model, find_structure(model))
    rotate_model(model, s)
    sites = block_sites(model, s)
    assert len(sites) == s.n_blocks
    layer = model.model.layers[2]
    b = sites[2]
    assert b.block is layer and b.attn is layer.self_attn and b.mlp is layer.mlp
    assert b.qkv == [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    assert b.o is layer.self_attn.o_proj and b.down is layer.mlp.down_proj
    assert b.gate_up == [layer.mlp.gate_proj, layer.mlp.up_proj]
    assert [name for name, _ in b.all_linears()] == ["qkv"] * 3 + ["o"] + ["gate_up"] * 2 + ["down"]
    assert all(b.linears(site) for site in SITES)


def test_sites_need_the_attention_swapped(stories):
    model = copy.deepcopy(stories[0])
    with pytest.raises(TypeError, match="PrefixAttention"):
        block_sites(model, find_structure(model))
