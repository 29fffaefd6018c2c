"""GPTQ: codes on the given grid, and a smaller layer-output error than round-to-nearest on the same grid."""

from __future__ import annotations

import warnings

import pytest
import torch

from pq_ao import quant_math
from pq_ao.calibration.gptq import gptq_quantize


def _correlated_inputs(t: int, k: int, gen) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones (what rotated LLM activations look like)."""
    base = torch.randn(t, k // 4, generator=gen) @ torch.randn(k // 4, k, generator=gen)
    return base + 0.3 * torch.randn(t, k, generator=gen)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,k,n", [(4, 96, 40), (4, 256, 64), (8, 128, 24)])
def test_gptq_beats_round_to_nearest_on_the_same_grid(bits, k, n, act_order):
    gen = torch.Generator().manual_seed(k + bits)
    x = _correlated_inputs(512, k, gen)
    w = torch.randn(n, k, generator=gen)
    scale = quant_math.per_channel_scale(w, bits)
    q, latent = gptq_quantize(w, x.T @ x, scale, bits, damp=0.01, block_size=32, act_order=act_order)
    assert q.dtype == torch.int8 and q.shape == (n, k)
    # the compensated weights round to the codes, and sit off the grid (they keep GPTQ's fed-forward errors)
    assert torch.equal(quant_math.quantize(latent, scale[:, None], bits), q)
    assert (latent - q.float() * scale[:, None]).abs().mean() > 0.05 * scale.mean()
    lo, hi = quant_math.qrange(bits)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    w_gptq = q.float() * scale[:, None]
    assert torch.equal(quant_math.quantize(w_gptq, scale[:, None], bits), q)  # on the grid: requantizes to itself
    rtn = quant_math.fake_quantize(w, scale[:, None], bits)
    err_gptq = (x @ (w - w_gptq).T).pow(2).sum()
    err_rtn = (x @ (w - rtn).T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def test_block_size_does_not_change_the_result_much_and_dead_columns_are_zero():
    gen = torch.Generator().manual_seed(3)
    x = _correlated_inputs(256, 64, gen)
    x[:, 5] = 0  # a column no input touches
    w = torch.randn(16, 64, generator=gen)
    s = quant_math.per_channel_scale(w, 4)
    a = gptq_quantize(w, x.T @ x, s, 4, block_size=64)[0]
    b = gptq_quantize(w, x.T @ x, s, 4, block_size=7)[0]
    assert (a != b).float().mean() < 0.05  # the same algorithm, other summation order
    assert (a[:, 5] == 0).all()
    assert (gptq_quantize(w, x.T @ x, s, 4, block_size=7, act_order=True)[0][:, 5] == 0).all()


def test_bad_arguments_are_named():
    w, g, s = torch.randn(4, 8), torch.eye(8), torch.ones(4)
    with pytest.raises(ValueError, match="gram"):
        gptq_quantize(w, torch.eye(7), s, 4)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, g, s, 4, damp=1.5)


def test_the_pipeline_rounds_with_gptq_on_the_same_grid():
    """quantize_ with gptq=True: the same per-channel scales as round-to-nearest (the grid), other codes, and a
    block-output error no larger (the prefix KV and earlier quantized blocks are present in GPTQ's Hessians)."""
    import copy

    import pq_ao

    base, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    kw = dict(n_samples=8, seqlen=256, grid_samples=2, grid_seqlen=256, grid_search=False)
    reports, models = {}, {}
    for gptq in (False, True):
        models[gptq] = copy.deepcopy(base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports[gptq] = pq_ao.quantize_(models[gptq], pq_ao.prefixquant_w4a4(gptq=gptq, **kw), tokenizer=tok)
        # 2 x 256 tokens for inputs up to 172 wide: GPTQ says its Hessians are thin (8 x 172 = 1376 wanted)
        assert any("GPTQ's Hessians come from grid_samples x grid_seqlen = 512 tokens" in str(w.message)
                   for w in caught) == gptq  # fmt: skip
    assert reports[True].config["gptq"] and pq_ao.state.state_of(models[True]).config.name == "w4a4kv4-gptq"
    w_rtn = models[False].model.layers[2].mlp.gate_up_proj.weight
    w_gptq = models[True].model.layers[2].mlp.gate_up_proj.weight
    assert not torch.equal(w_rtn.qdata, w_gptq.qdata)
    torch.testing.assert_close(w_gptq.scale, w_rtn.scale, rtol=1e-5, atol=0)  # the same grid (up to earlier blocks)
    mse = {g: sum(b.mse_after for b in r.blocks) for g, r in reports.items()}
    assert mse[True] <= mse[False], mse


def test_act_order_puts_the_codes_back_in_place():
    """With uncorrelated inputs (a diagonal Hessian) no error is fed forward: GPTQ is round-to-nearest in any column
    order, so act-order (uneven channel energies: a real permutation) must give RTN's codes column for column."""
    gen = torch.Generator().manual_seed(5)
    k = 48
    energy = torch.rand(k, generator=gen) * 10 + 0.1
    w = torch.randn(12, k, generator=gen)
    s = quant_math.per_channel_scale(w, 4)
    h = torch.diag(energy)
    assert not torch.equal(torch.argsort(energy, descending=True), torch.arange(k))
    rtn = quant_math.quantize(w, s[:, None], 4)
    for act_order in (False, True):
        assert torch.equal(gptq_quantize(w, h, s, 4, block_size=16, act_order=act_order)[0], rtn)


def test_act_order_helps_where_a_few_channels_dominate():
    """Rotated activations still have uneven channel energies; feeding the big channels' errors forward first gives
    a layer-output error no larger than the natural order (here, clearly smaller)."""
    gen = torch.Generator().manual_seed(11)
    x = _correlated_inputs(1024, 128, gen) * (1 + 8 * (torch.rand(128, generator=gen) > 0.9))
    w = torch.randn(32, 128, generator=gen)
    s = quant_math.per_channel_scale(w, 4)
    err = {}
    for act_order in (False, True):
        wq = gptq_quantize(w, x.T @ x, s, 4, block_size=32, act_order=act_order)[0].float() * s[:, None]
        err[act_order] = float((x @ (w - wq).T).pow(2).sum())
    assert err[True] < err[False], err
