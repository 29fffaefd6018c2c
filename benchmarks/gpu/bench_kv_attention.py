"""GPU box: decode attention over a packed int4 KV cache (`pq_ao::kv_attention`) against bf16 SDPA.

    PYTHONPATH=. python benchmarks/gpu/bench_kv_attention.py --json $OUT/kv_attention.json [--sweep]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu/bench_kv_attention.py --smoke    (CPU: the check)

Llama-3-8B decode shapes (Hq 32, Hkv 8, D 128, a 4-token prefix, one query per sequence) x B {1, 16} x
S {2048, 8192}. For each: (a) the op against the reference on random data (each sequence its own length,
outputs poisoned first); (b) median times (`do_bench` over CUDA-graph replays of R calls on R different
caches, > 3x L2, divided by R) of the op over the int4 cache (every slot visible) and of
`F.scaled_dot_product_attention` over a bf16 cache of the same P + S slots, with `enable_gqa=True` and with
K/V `repeat_interleave`d to Hq heads; GB/s on the cache bytes (int4 K + V codes; bf16 K + V) and the speedup
over the faster SDPA. `--sweep` also times a few kernel configurations per shape. The markdown table is
printed last; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import copy_tbps, timed  # noqa: E402

from pq_ao import quant_math  # noqa: E402
from pq_ao.kernels import reference  # noqa: E402
from pq_ao.kernels import triton as tk  # noqa: E402
from pq_ao.kernels.triton.attention import AttnConfig, pick_block_s, pick_splits  # noqa: E402

HQ, HKV, D, P = 32, 8, 128, 4
BATCHES, LENGTHS = (1, 16), (2048, 8192)
SWEEP = [AttnConfig(block_s=bs, num_warps=w, num_stages=st, skip_masked=sk)
         for bs, w, st, sk in ((64, 4, 3, False), (64, 4, 2, False), (128, 4, 3, False), (128, 4, 2, False),
                               (128, 8, 3, False), (64, 2, 3, False), (64, 4, 3, True), (128, 4, 3, True))]


def cache_bytes(b: int, s: int, bits: int = 4) -> int:
    """Bytes of the K and V codes: what the op must read (the mask and q add B * S and a few KB)."""
    return 2 * b * HKV * s * D * bits // 8


def op_inputs(b: int, s: int, device, seed: int = 0, lengths: bool = False, hq: int = HQ, hkv: int = HKV,
              d: int = D, p: int = P):
    """Operands of kv_attention: bf16 q, int4 codes, per-head scales, a bf16 prefix, a mask (all slots
    visible, or each sequence its own random length with `lengths`)."""
    gen = torch.Generator().manual_seed(seed)
    codes = [quant_math.pack_int4(torch.randint(-8, 8, (b, hkv, s, d), generator=gen, dtype=torch.int8))
             for _ in range(2)]
    mask = torch.ones(b, 1, s, dtype=torch.bool)
    if lengths:
        n = torch.randint(1, s + 1, (b,), generator=gen)
        mask = torch.arange(s)[None, None, :] < n[:, None, None]
    args = (torch.randn(b, hq, 1, d, generator=gen).bfloat16(), codes[0], codes[1],
            torch.rand(hkv, generator=gen) * 0.2 + 0.1, torch.rand(hkv, generator=gen) * 0.2 + 0.1,
            torch.randn(1, hkv, p, d, generator=gen).bfloat16(),
            torch.randn(1, hkv, p, d, generator=gen).bfloat16(), mask)
    return tuple(a.to(device) for a in args) + (d**-0.5, 4)


def check(b: int, s: int, device: str, **shape) -> dict:
    """The launcher (CUDA: through the op) against the reference; relative error of the worst row."""
    args = op_inputs(b, s, device, seed=b * 7 + s, lengths=True, **shape)
    want = reference.kv_attention(*args).float()
    run = torch.ops.pq_ao.kv_attention if device == "cuda" else tk.kv_attention
    if device == "cuda":
        t = torch.empty(want.numel() * 2, dtype=torch.uint8, device=device).fill_(0xFF)  # poison the cache
        del t
    got = run(*args).float()
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)).max().item()
    ok = bool(not torch.isnan(got).any().item() and err < 1e-2)
    return dict(max_rel_err=err, ok=ok)


def _ours(b, s, cfg=None):
    def make(i):
        a = op_inputs(b, s, "cuda", seed=100 + i)
        if cfg is None:
            return lambda: torch.ops.pq_ao.kv_attention(*a)
        return lambda: tk.kv_attention_with_config(*a, cfg)
    return make


def _sdpa(b, s, repeat: bool):
    def make(i):
        gen = torch.Generator(device="cuda").manual_seed(200 + i)
        q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, HKV, P + s, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        if repeat:
            k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
            return lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=True)
    return make


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench_shape(b: int, s: int, sweep: bool) -> dict:
    ours_bytes = cache_bytes(b, s)
    bf16_bytes = 2 * b * HKV * (P + s) * D * 2
    block_s = pick_block_s(b * HKV, s)
    row = dict(B=b, S=s, block_s=block_s, splits=pick_splits(b * HKV, s, block_s), check=check(b, s, "cuda"))
    row["ours_ms"] = timed(_ours(b, s), ours_bytes, cap=64)
    row["ours_eager_ms"] = timed(_ours(b, s), ours_bytes, graph=False, cap=64)
    for name, repeat in (("sdpa_gqa", False), ("sdpa_repeat", True)):
        try:
            row[f"{name}_ms"] = timed(_sdpa(b, s, repeat), bf16_bytes * (HQ // HKV if repeat else 1), cap=64)
        except RuntimeError as e:  # e.g. no SDPA backend for enable_gqa on this build
            row[f"{name}_ms"], row[f"{name}_error"] = None, str(e)[:200]
    row["ours_GBps"] = gbps(ours_bytes, row["ours_ms"])
    sdpa = [row[k] for k in ("sdpa_gqa_ms", "sdpa_repeat_ms") if row[k] is not None]
    row["sdpa_ms"] = min(sdpa) if sdpa else None
    row["sdpa_GBps"] = gbps(bf16_bytes, row["sdpa_gqa_ms"]) if row["sdpa_gqa_ms"] else None
    row["speedup"] = row["sdpa_ms"] / row["ours_ms"] if row["sdpa_ms"] else None
    if sweep:
        row["sweep"] = {repr(c): timed(_ours(b, s, c), ours_bytes, cap=64) for c in SWEEP}
        best = min(row["sweep"], key=row["sweep"].get)
        print(f"B={b} S={s}: best {best} {row['sweep'][best] * 1e3:.1f} us", flush=True)
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows) -> str:
    lines = ["| B | S | check (max rel err) | ours us | ours GB/s | ours eager us | SDPA gqa us "
             "| SDPA repeat us | SDPA GB/s | speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = [r.get(k) for k in ("ours_ms", "ours_eager_ms", "sdpa_gqa_ms", "sdpa_repeat_ms")]
        us = [_fmt(None if m is None else m * 1e3, ".1f") for m in ms]
        chk = f"{'ok' if r['check']['ok'] else 'FAIL'} ({r['check']['max_rel_err']:.1e})"
        lines.append(f"| {r['B']} | {r['S']} | {chk} | {us[0]} | {_fmt(r['ours_GBps'], '.0f')} | {us[1]} "
                     f"| {us[2]} | {us[3]} | {_fmt(r['sdpa_GBps'], '.0f')} | {_fmt(r['speedup'], '.2f')}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sweep", action="store_true", help="also time a few kernel configurations per shape")
    ap.add_argument("--smoke", action="store_true", help="only the check, on small shapes (CPU: interpreter)")
    args = ap.parse_args(argv)
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        small = dict(hq=8, hkv=2, d=32)
        results = [dict(B=b, S=s, check=check(b, s, device, **small)) for b, s in ((1, 70), (3, 129))]
        print(json.dumps(results, indent=1))
        if not all(r["check"]["ok"] for r in results):
            raise SystemExit("check failed")
        return results
    import triton

    copy = copy_tbps() * 1e3  # GB/s

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               copy_GBps=copy)
    print(f"{env['device']}: copy {copy:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for b_ in BATCHES:
        for s in LENGTHS:
            row = bench_shape(b_, s, args.sweep)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
