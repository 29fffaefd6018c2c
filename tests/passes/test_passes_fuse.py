"""The fusion pass: q/k/v and gate/up of a quantized model become single linears with the same results, and come
apart again for code that walks the separate linears."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pq_ao
from pq_ao.nn.fused_linear import FusedGatedMLP
from pq_ao.passes import fuse_projections, unfuse_projections, unfused

SMALL = dict(n_samples=4, seqlen=64, grid_samples=1, grid_seqlen=64, grid_search=False)


@pytest.fixture(scope="module")
def separate():
    """stories260K, W4A4KV4, quantized without the final fusion."""
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(fuse_projections=False, **SMALL), tokenizer=tok)
    return model


def _ids(seed=0):
    return torch.randint(3, 512, (2, 33), generator=torch.Generator().manual_seed(seed))


def test_fusing_keeps_the_outputs_and_unfusing_restores_them(separate):
    ids = _ids()
    with torch.no_grad():
        before = separate(input_ids=ids).logits
        layer = separate.model.layers[1]
        x = torch.randn(2, 5, layer.self_attn.q_proj.in_features)
        qkv = [getattr(layer.self_attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
        gate = layer.mlp.gate_proj(x)
        names = fuse_projections(separate)
        try:
            assert len(names) == 2 * len(separate.model.layers)
            assert all(isinstance(lay.mlp, FusedGatedMLP) and lay.self_attn.qkv_proj is not None
                       for lay in separate.model.layers)  # fmt: skip
            for got, want in zip(layer.self_attn.qkv_proj(x), qkv):
                assert torch.equal(got, want)
            assert torch.equal(separate.model.layers[1].mlp.gate_up_proj(x)[0], gate)
            assert separate.model.layers[1].mlp._gating_fusable()  # SiLU into down_proj's quantizer
            fused = separate(input_ids=ids).logits
            assert ((fused - before).norm() / before.norm()) < 1e-5  # SiLU on strided views may round differently
        finally:
            unfuse_projections(separate)
        assert not any(isinstance(m, FusedGatedMLP) for m in separate.modules())
        assert torch.equal(separate(input_ids=ids).logits, before)


def test_unfused_context_and_saved_directories_use_the_separate_names(separate, tmp_path):
    fuse_projections(separate)
    try:
        with unfused(separate):
            assert hasattr(separate.model.layers[0].self_attn, "q_proj")
        assert separate.model.layers[0].self_attn.qkv_proj is not None
        pq_ao.save_quantized(separate, tmp_path / "m")
        assert separate.model.layers[0].self_attn.qkv_proj is not None  # fused again after saving
        meta = json.loads((tmp_path / "m" / "pq_ao_config.json").read_text())
        assert "model.layers.0.self_attn.q_proj" in meta["linears"] and "model.layers.0.mlp.up_proj" in meta["linears"]
        loaded, _ = pq_ao.load_quantized(tmp_path / "m")
        assert hasattr(loaded.model.layers[0].self_attn, "q_proj")  # its config says fuse_projections=False
        with torch.no_grad():
            want = separate(input_ids=_ids(1)).logits
            assert ((loaded(input_ids=_ids(1)).logits - want).norm() / want.norm()) < 1e-5
    finally:
        unfuse_projections(separate)


def test_an_mlp_of_another_form_stays_separate(separate):
    class SwappedMLP(nn.Module):
        """gate and up the other way round: down(act(up(x)) * gate(x))."""

        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    original = separate.model.layers[0].mlp
    separate.model.layers[0].mlp = SwappedMLP(original)
    try:
        names = fuse_projections(separate)
        assert "model.layers.0.mlp.gate_up_proj" not in names and "model.layers.1.mlp.gate_up_proj" in names
        assert isinstance(separate.model.layers[0].mlp, SwappedMLP) and hasattr(separate.model.layers[0].mlp, "up_proj")
    finally:
        unfuse_projections(separate)
        separate.model.layers[0].mlp = original
