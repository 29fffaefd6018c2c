"""Block-wise calibration: the searches reuse intermediates instead of re-running blocks; check that what they
report and hand on equals fresh passes over the calibrated block."""

from __future__ import annotations

import pytest
import torch

import pq_ao
from pq_ao import quant_math
from pq_ao.calibration import grid_search
from pq_ao.calibration.grid_search import BlockCalibrator, _coarse_to_fine, _mse, _run
from pq_ao.calibration.sites import SITES

SMALL = dict(n_samples=8, seqlen=128, grid_samples=2, grid_seqlen=128)


@pytest.mark.parametrize("config", [pq_ao.prefixquant_w4a4(**SMALL), pq_ao.quarot_w4a4(**SMALL, act_clip=None),
                                    pq_ao.quarot_w4a4(**SMALL), pq_ao.prefixquant_w8a8(**SMALL, grid_search=False)],
                         ids=["static", "dynamic-searched", "dynamic-fixed-clip", "no-search"])  # fmt: skip
def test_block_output_and_errors_equal_fresh_passes(monkeypatch, config):
    original = BlockCalibrator.__call__
    checked = []

    def checking(self, bs, x, kwargs, x_ft=None, ft_kwargs=None):
        y = _run(bs.block, x, kwargs, self.chunk)  # the block is still full precision
        x_next, x_ft_next, plan = original(self, bs, x, kwargs, x_ft, ft_kwargs)
        fresh = _run(bs.block, x, kwargs, self.chunk)
        assert torch.equal(x_next, fresh), f"block {bs.index}: the handed-on output is not the calibrated block's"
        assert plan.mse_after == _mse(fresh, y)
        # mse_before: every activation at its min-max scale (dynamic: clip 1), weights and KV as calibrated
        field = "act_scale" if self.cfg.act_mode == "static" else "act_clip"
        kept = {}
        for site in SITES:
            absmax = torch.tensor([self.stats.act[(bs.index, site)]])
            for lin in bs.linears(site):
                kept[lin] = getattr(lin.weight, field).clone()
                minmax = quant_math.scale_from_absmax(absmax, self.cfg.a_bits) if field == "act_scale" else 1.0
                getattr(lin.weight, field).copy_(minmax if field == "act_scale" else torch.ones(1))
        assert plan.mse_before == pytest.approx(_mse(_run(bs.block, x, kwargs, self.chunk), y), rel=1e-6)
        for lin, value in kept.items():
            getattr(lin.weight, field).copy_(value)
        assert plan.mse_after <= plan.mse_before * 1.0001 or self.cfg.act_clip is not None
        checked.append(bs.index)
        return x_next, x_ft_next, plan

    monkeypatch.setattr(BlockCalibrator, "__call__", checking)
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    report = pq_ao.quantize_(model, config, tokenizer=tok)
    assert checked == list(range(5))
    if config.grid_search and config.act_clip is None:
        assert all(set(b.act_clip) == set(SITES) for b in report.blocks)


def test_static_search_passes_per_block(monkeypatch):
    """Up to 11 activation evaluations per site (fewer where a refinement point leaves (0, 1]), one block pass to
    start (FP output, statistics, Grams, q/k/v): nothing else."""
    calls = {"tail": 0, "qkv": 0, "run": 0}
    tail, run = BlockCalibrator._tail, grid_search._run

    def counting_tail(self, bs, site, *a):
        calls["tail"] += 1
        calls["qkv"] += site == "qkv"
        return tail(self, bs, site, *a)

    def counting_run(*a):
        calls["run"] += 1
        return run(*a)

    monkeypatch.setattr(BlockCalibrator, "_tail", counting_tail)
    monkeypatch.setattr(grid_search, "_run", counting_run)
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(**SMALL), tokenizer=tok)
    assert 5 * 4 * 9 <= calls["tail"] <= 5 * 4 * 11
    assert calls["run"] == 5 + calls["qkv"]  # the first pass, then the qkv tails (whole-block runs)


def test_coarse_to_fine_finds_the_minimum_and_evaluates_each_point_once():
    seen = []

    def objective(a):
        seen.append(a)
        return (a - 0.33) ** 2

    best = _coarse_to_fine(objective, [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0], rounds=2)
    assert abs(best - 0.33) <= 0.0375 / 2 + 1e-9
    assert len(seen) == len(set(seen)) == 11
    flat = _coarse_to_fine(lambda a: 1.0, [0.1, 0.55, 1.0], rounds=1)
    assert flat == 1.0  # ties go to the larger clip
