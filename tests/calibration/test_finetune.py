"""Block-wise fine-tuning: every block's loss goes down, the block ends converted again (integer kernels), nothing
is left requiring gradients, and the model's block outputs get closer to full precision."""

from __future__ import annotations

import copy

import pytest
import torch

import pq_ao
from pq_ao.calibration.finetune import TrainableQuantLinear
from pq_ao.tensors import IntxLinearWeight

KW = dict(n_samples=8, seqlen=128, grid_samples=2, grid_seqlen=128, ft_samples=4, ft_seqlen=128, ft_epochs=3,
          ft_lr_weight=1e-4, ft_lr_scale=1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def runs():
    base, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    out = {}
    for ft in (False, True):
        model = copy.deepcopy(base)
        out[ft] = (model, pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(finetune=ft, **KW), tokenizer=tok))
    return out


def test_every_block_trains_down_and_ends_converted(runs):
    model, report = runs[True]
    assert report.calibration["ft_samples"] == 4 and pq_ao.state.state_of(model).config.name == "w4a4kv4-ft"
    for plan in report.blocks:
        ft = plan.finetune
        assert ft["steps"] == 3 * 4 and ft["loss_after"] <= ft["loss_before"], ft
        assert ft["kept"] == (ft["loss_after"] < ft["loss_before"])
    assert sum(plan.finetune["kept"] for plan in report.blocks) >= 3  # most blocks improve
    assert not any(isinstance(m, TrainableQuantLinear) for m in model.modules())
    mlp = model.model.layers[1].mlp  # gate/up fused at the end
    assert all(isinstance(m.weight, IntxLinearWeight) for m in (mlp.gate_up_proj, mlp.down_proj))
    assert not any(p.grad is not None for p in model.parameters())
    for layer in model.model.layers:
        for q in (layer.self_attn.k_quant, layer.self_attn.v_quant):
            assert not q.ste and not q.scale.requires_grad and q.scale.dtype == torch.float32
            assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


def test_fine_tuning_brings_the_blocks_closer_to_full_precision(runs):
    mse = {ft: sum(b.mse_after for b in r.blocks) for ft, (_, r) in runs.items()}
    assert mse[True] < mse[False], mse


def test_the_fine_tuned_model_compiles_and_round_trips(runs, tmp_path):
    model, _ = runs[True]
    pq_ao.save_quantized(model, tmp_path / "m")
    loaded, _ = pq_ao.load_quantized(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.qkv_proj is not None  # fused on load, as quantize_ left it
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_fine_tuning_stream_may_be_longer_than_the_calibration_windows():
    """ft_seqlen != grid_seqlen (the paper: 1024-token fine-tuning after 512-token calibration): the fine-tuning
    stream runs with its own rotary embeddings (it failed with a shape mismatch when it reused the grid's)."""
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    kw = {**KW, "ft_seqlen": 192, "ft_samples": 2, "ft_epochs": 1}
    report = pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(finetune=True, **kw), tokenizer=tok)
    assert all(plan.finetune["steps"] == 2 for plan in report.blocks)


@pytest.mark.parametrize("gptq", [False, True])
def test_training_starts_from_the_block_as_converted(gptq, monkeypatch):
    """The trainable block's loss before the first step is the converted block's (GPTQ's rounding included): with
    GPTQ, training from the full-precision weights would start from plain rounding instead and throw GPTQ's error
    compensation away (it did, and GPTQ + fine-tuning then came out worse than GPTQ alone)."""
    from pq_ao.calibration import finetune, grid_search

    seen = []

    def recording(bs, start, x, y, kwargs, cfg):
        converted = finetune._loss(bs, x, y, kwargs, cfg.ft_batch_size)
        result = finetune.fine_tune_block(bs, start, x, y, kwargs, cfg)
        seen.append((converted, result.loss_before))
        return result

    monkeypatch.setattr(grid_search, "fine_tune_block", recording)
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    kw = {**KW, "ft_samples": 2, "ft_epochs": 1}
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(finetune=True, gptq=gptq, **kw), tokenizer=tok)
    assert len(seen) == model.config.num_hidden_layers
    for converted, before in seen:
        assert before == pytest.approx(converted, rel=1e-4), seen


def test_a_zero_scale_rate_trains_the_weights_alone(monkeypatch):
    """ft_lr_scale=0: every quantizer scale (weights' per channel, activations', K/V's) stays as calibrated while
    the weights train (the codes move in the blocks that improve)."""
    from pq_ao.calibration import finetune, grid_search
    from pq_ao.calibration.sites import SITES

    seen = []

    def scales(bs):
        lins = [lin for site in SITES for lin in bs.linears(site)]
        return ([lin.weight.scale.clone() for lin in lins] + [lin.weight.act_scale.clone() for lin in lins]
                + [bs.attn.k_quant.scale.clone(), bs.attn.v_quant.scale.clone()]), [lin.weight.qdata.clone() for lin in lins]

    def recording(bs, start, x, y, kwargs, cfg):
        before = scales(bs)
        result = finetune.fine_tune_block(bs, start, x, y, kwargs, cfg)
        seen.append((before, scales(bs), result.kept))
        return result

    monkeypatch.setattr(grid_search, "fine_tune_block", recording)
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(finetune=True, **{**KW, "ft_lr_scale": 0.0}), tokenizer=tok)
    assert sum(kept for *_, kept in seen) >= 3
    for (s0, q0), (s1, q1), kept in seen:
        assert all(torch.equal(a, b) for a, b in zip(s0, s1))
        assert kept == any(not torch.equal(a, b) for a, b in zip(q0, q1))


def test_with_gptq_the_weight_scales_stay_and_the_activation_scales_train(monkeypatch):
    """GPTQ's codes are tied to the grid it rounded on: fine-tuning after GPTQ keeps every per-channel weight scale and
    trains the activation and K/V scales (and the weights)."""
    from pq_ao.calibration import finetune, grid_search
    from pq_ao.calibration.sites import SITES

    seen = []

    def recording(bs, start, x, y, kwargs, cfg):
        lins = lambda: [lin for site in SITES for lin in bs.linears(site)]  # noqa: E731
        before = ([lin.weight.scale.clone() for lin in lins()], [lin.weight.act_scale.clone() for lin in lins()])
        result = finetune.fine_tune_block(bs, start, x, y, kwargs, cfg)
        seen.append((before, ([lin.weight.scale for lin in lins()], [lin.weight.act_scale for lin in lins()]),
                     result.kept))
        return result

    monkeypatch.setattr(grid_search, "fine_tune_block", recording)
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(finetune=True, gptq=True, **KW), tokenizer=tok)
    assert sum(kept for *_, kept in seen) >= 3
    for (w0, a0), (w1, a1), kept in seen:
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))
        assert not kept or any(not torch.equal(a, b) for a, b in zip(a0, a1))
