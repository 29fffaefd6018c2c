"""`benchmarks/bench_e2e.py` times what a user's inference runs: no autograd recording in the timed calls."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_e2e  # noqa: E402


def test_prefill_records_no_autograd_graph(monkeypatch):
    """Prefill ran with grad enabled: the HF cache tensors then required grad and chained every timed call's saved
    activations (an 80 GB H100 ran out of memory in the bf16 rows, 2026-12-07)."""
    monkeypatch.setattr(bench_e2e, "DEVICE", "cpu")
    monkeypatch.setattr(bench_e2e, "PREFILL", 16)
    caches = []
    make = bench_e2e.make_cache
    monkeypatch.setattr(bench_e2e, "make_cache", lambda *a: caches.append(make(*a)) or caches[-1])
    model = bench_e2e.build_model(1, dict(bench_e2e.TINY, hidden_size=64, intermediate_size=128, head_dim=32))
    row = bench_e2e.bench_prefill(model, "hf")
    assert len(row["prefill_ms_runs"]) == 10
    assert caches and not any(t.requires_grad for layer in caches[0].layers for t in (layer.keys, layer.values))


def test_prefill_check_compares_the_fresh_and_masked_paths(monkeypatch):
    """`--check` on a small fp32 static model on the CPU: the fresh-cache and the masked path give the same logits,
    compiled and eager (a check that can fail: a wrong path differs by far more than 1e-4)."""
    monkeypatch.setattr(bench_e2e, "DEVICE", "cpu")
    monkeypatch.setattr(bench_e2e, "PREFILL", 16)
    base = bench_e2e.build_model(1, dict(bench_e2e.TINY, hidden_size=64, intermediate_size=128, head_dim=32)).float()
    model, _ = bench_e2e.quantized(base, "static", 2)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    ids = torch.randint(10, model.config.vocab_size, (1, 16))
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            got = bench_e2e.check_prefill_paths(model, compiled, ids, bench_e2e.cache_kw(model))
    finally:
        torch._dynamo.reset()
    assert got["fresh_vs_masked"] < 1e-4 and got["fresh_vs_eager"] < 1e-4 and got["masked_vs_eager"] < 1e-4
    assert len(set(got["argmax_fresh_masked_eager"])) == 1
