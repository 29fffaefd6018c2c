"""Linear-layer benchmark on the GPU: pq_ao's Triton W4A4 / W4A8 / W8A8 kernels against bf16 cuBLAS, torch._int_mm,
fp8 _scaled_mm, a QuaRot-style dynamic per-token W4A4 linear, torchao's Int8DynamicActivationInt8WeightConfig and
torchao's int4 weight-only (tinygemm: the batch-1 decode peer).

    PYTHONPATH=. python benchmarks/bench_linear.py --out benchmarks/results [--tune] [--quick]

Llama-3-8B linear shapes (N x K) x M tokens, random data (never zeros). Every method is timed as a CUDA graph of R
calls over R different input sets (R chosen so each replay touches > 3x the L2), median of triton.testing.do_bench,
divided by R: no launch gaps, no cache flattery. Also measured in the same run: the ceilings (device copy, bf16 /
int8 / fp8 matmuls at 8192^3). `--tune` first sweeps kernel configurations per M bucket (each candidate checked
for exact integer results) and benchmarks with the winners. Writes linear_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import act, ceilings, gen, log, rand_int8, rand_packed, randf, rotations, time_calls  # noqa: E402

from pq_ao.kernels import reference  # noqa: E402
from pq_ao.kernels import triton as tk  # noqa: E402
from pq_ao.kernels.triton.gemm import (  # noqa: E402
    GemmConfig,
    dp4a_supported,
    gemv_config,
    int_linear_with_config,
    pick_config,
    skinny_config,
)

# (N, K): o_proj, k/v, gate or up, down, and the fused q/k/v and gate/up the model runs (pq_ao.passes.fuse)
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (28672, 4096)]
MS = [1, 4, 16, 64, 256, 1024, 2048, 4096, 8192]
DATE = "2026-11-23"

# ----------------------------------------------------------------------------------------------------------------
# methods: each returns (list of callables over rotated inputs, bytes per call, note)


def _ours(m, n, k, dev, a_bits, w_bits, quantize, cfg_for, dynamic=False):
    ws = randf(n) * 0.01 + 1e-3
    kb_w = k // 2 if w_bits == 4 else k
    kb_a = k // 2 if a_bits == 4 else k
    per_call = n * kb_w + m * (2 * k if quantize else kb_a) + m * n * 2
    r = rotations(per_call)
    cfg = cfg_for(m, n, k, a_bits, w_bits)
    calls = []
    for _ in range(r):
        wq = rand_packed(n, k, dev) if w_bits == 4 else rand_int8(n, k, dev)
        if quantize:
            x = act(m, k, dev)
            xs = (x.abs().amax().float() / 7.0).reshape(1)
            if dynamic:
                def f(x=x, wq=wq):
                    q, s = tk.quantize_dynamic(x, a_bits)
                    return int_linear_with_config(q, s, wq, ws, None, a_bits, w_bits, torch.bfloat16, cfg)
            elif m == 1 and dp4a_supported(k, a_bits, w_bits):
                def f(x=x, wq=wq, xs=xs):  # batch-1 decode: one kernel, quantization in the GEMV (pick_config)
                    return tk.static_linear(x, xs, None, wq, ws, None, a_bits, w_bits, torch.bfloat16)
            else:
                def f(x=x, wq=wq, xs=xs):
                    q = tk.quantize_static(x, xs, a_bits)
                    return int_linear_with_config(q, xs, wq, ws, None, a_bits, w_bits, torch.bfloat16, cfg)
        else:
            xq = rand_packed(m, k, dev) if a_bits == 4 else rand_int8(m, k, dev)
            xs = randf(1) * 0.1 + 0.01

            def f(xq=xq, wq=wq, xs=xs):
                return int_linear_with_config(xq, xs, wq, ws, None, a_bits, w_bits, torch.bfloat16, cfg)
        calls.append(f)
    return calls, per_call, f"{cfg.kind} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" \
        f" split{cfg.split_k}"


def m_bf16(m, n, k, dev, cfg_for):
    per_call = 2 * (n * k + m * k + m * n)
    calls = []
    for _ in range(rotations(per_call)):
        x, w = act(m, k, dev), torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen()) * 0.02
        calls.append(lambda x=x, w=w: F.linear(x, w))
    return calls, per_call, "cuBLAS"


def m_int_mm(m, n, k, dev, cfg_for):
    if m <= 16:
        raise RuntimeError("torch._int_mm needs M > 16")
    per_call = n * k + m * k + m * n * 2
    ws = randf(1, n) * 0.01
    calls = []
    for _ in range(rotations(per_call)):
        xq, wq = rand_int8(m, k, dev), rand_int8(n, k, dev)
        xs = randf(m, 1) * 0.01
        calls.append(lambda xq=xq, wq=wq, xs=xs: (torch._int_mm(xq, wq.t()).float() * xs * ws).to(torch.bfloat16))
    return calls, per_call, "_int_mm + scale epilogue (torch ops)"


def m_fp8(m, n, k, dev, cfg_for):
    per_call = n * k + m * k + m * n * 2
    calls = []
    mp = max(16, m)  # _scaled_mm wants M a multiple of 16 on some versions: pad
    for _ in range(rotations(per_call)):
        x8 = torch.randn(mp, k, device=dev, generator=gen()).to(torch.float8_e4m3fn)
        w8 = torch.randn(n, k, device=dev, generator=gen()).to(torch.float8_e4m3fn)
        sa = randf(mp, 1) + 0.5
        sb = randf(1, n) + 0.5
        calls.append(lambda x8=x8, w8=w8, sa=sa, sb=sb: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb,
                                                                         out_dtype=torch.bfloat16))
    return calls, per_call, "rowwise, pre-quantized" + (f", M padded to {mp}" if mp != m else "")


def m_torchao(m, n, k, dev, cfg_for):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    per_call = n * k + m * k * 2 + m * n * 2
    calls = []
    for _ in range(rotations(per_call, cap=8)):
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        quantize_(lin, Int8DynamicActivationInt8WeightConfig())
        x = act(m, k, dev)
        calls.append(lambda lin=lin, x=x: lin(x))
    return calls, per_call, "eager (not graph-capturable), per-token dynamic int8 act, _int_mm"


def m_torchao_int4wo(m, n, k, dev, cfg_for):
    """The batch-1 decode peer: torchao's int4 weight-only, group 128, tinygemm (`aten._weight_int4pack_mm`)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quant_api import Int4PackingFormat

    config = Int4WeightOnlyConfig(group_size=128, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    per_call = n * k // 2 + n * (k // 128) * 4 + m * k * 2 + m * n * 2
    calls = []
    for _ in range(rotations(per_call, cap=8)):
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        quantize_(lin, config)
        x = act(m, k, dev)
        calls.append(lambda lin=lin, x=x: lin(x))
    return calls, per_call, "torchao Int4WeightOnlyConfig(128, tile_packed_to_4d): tinygemm, bf16 activations"


METHODS = {
    "bf16": m_bf16,
    "w4a4_linear": lambda m, n, k, d, c: _ours(m, n, k, d, 4, 4, True, c),
    "w4a4_gemm": lambda m, n, k, d, c: _ours(m, n, k, d, 4, 4, False, c),
    "w4a8_gemm": lambda m, n, k, d, c: _ours(m, n, k, d, 8, 4, False, c),
    "w8a8_gemm": lambda m, n, k, d, c: _ours(m, n, k, d, 8, 8, False, c),
    "int_mm_w8a8": m_int_mm,
    "fp8_rowwise": m_fp8,
    "quarot_w4a4_linear": lambda m, n, k, d, c: _ours(m, n, k, d, 4, 4, True, c, dynamic=True),
    "torchao_int8dyn": m_torchao,
    "torchao_int4wo": m_torchao_int4wo,
}


# ----------------------------------------------------------------------------------------------------------------
# tuning


def candidates(bucket, a_bits, w_bits):
    """Configurations tried per M bucket; split_k=0 means automatic (resolved per shape by resolve())."""
    if bucket == "gemv":
        return [GemmConfig(0, bn, bk, w, st, group_m=1, split_k=sp, kind="dp4a") for bn, bk, w, st, sp in [
            (32, 512, 4, 4, 0), (64, 512, 4, 4, 0), (16, 1024, 4, 3, 0), (32, 1024, 4, 3, 0), (64, 256, 4, 4, 0),
            (128, 256, 8, 3, 0), (32, 512, 4, 4, 1)]]
    if bucket == "skinny":
        return [GemmConfig(16, bn, bk, w, st, group_m=1, split_k=sp) for bn, bk, w, st, sp in [
            (64, 512, 4, 4, 0), (32, 512, 4, 4, 0), (64, 256, 4, 4, 0), (128, 256, 4, 3, 0), (64, 1024, 4, 3, 0)]]
    if bucket == "small":
        return [GemmConfig(*c) for c in [(64, 128, 256, 4, 4), (64, 64, 256, 4, 4), (64, 256, 128, 4, 4),
                                         (128, 128, 256, 8, 3), (64, 128, 128, 4, 5)]]
    if bucket == "mid":
        return [GemmConfig(*c) for c in [(128, 128, 256, 8, 4), (128, 256, 128, 8, 3), (64, 256, 128, 4, 4),
                                         (128, 128, 128, 4, 4), (64, 128, 256, 4, 4)]]
    if a_bits == 8 or w_bits == 8:
        return [GemmConfig(*c) for c in [(128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 4),
                                         (128, 128, 128, 4, 4)]]
    cs = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 4, 4), (128, 128, 256, 8, 3),
          (256, 128, 128, 8, 3), (128, 256, 64, 8, 5), (64, 256, 128, 4, 4), (128, 128, 128, 8, 5)]
    return [GemmConfig(*c) for c in cs] + [GemmConfig(128, 256, 128, 8, 3, split_nibbles=False)]


def resolve(cfg, m, n, k, w_bits):
    """A candidate made concrete for one shape: the GEMV's rows per program, automatic K splits."""
    if cfg.kind == "dp4a":
        return gemv_config(m, n, k, w_bits, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k)

    if cfg.split_k == 0:
        return skinny_config(m, n, k, w_bits, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    return cfg


BUCKETS = {  # bucket -> M values it is tuned at (the bucket covers M up to the largest)
    "gemv": [1, 4],
    "skinny": [16],
    "small": [64],
    "mid": [256],
    "large": [2048, 8192],
}


def bucket_of(m, k, a_bits, w_bits):
    if m <= 4 and dp4a_supported(k, a_bits, w_bits):
        return "gemv"
    if m <= 16:
        return "skinny"
    if m <= 64:
        return "small"
    if m <= 256:
        return "mid"
    return "large"


def check_exact(cfg, m, n, k, a_bits, w_bits, dev):
    xq = rand_packed(m, k, dev) if a_bits == 4 else rand_int8(m, k, dev)
    wq = rand_packed(n, k, dev) if w_bits == 4 else rand_int8(n, k, dev)
    one, ones = torch.ones(1, device=dev), torch.ones(n, device=dev)
    got = int_linear_with_config(xq, one, wq, ones, None, a_bits, w_bits, torch.float32, cfg)
    want = reference.int_linear(xq, one, wq, ones, None, a_bits, w_bits, torch.float32)
    return bool(torch.equal(got, want))


def tune_points(bits_list):
    """(a_bits, w_bits, bucket, m, n, k) points the sweep times every candidate at."""
    pts = []
    for a_bits, w_bits in bits_list:
        for bucket, ms in BUCKETS.items():
            w4a4 = (a_bits, w_bits) == (4, 4)
            if not w4a4 and bucket not in ("large", "gemv"):
                continue
            if bucket == "gemv" and (a_bits, w_bits) not in ((4, 4), (8, 4), (8, 8)):
                continue
            for m in ms if w4a4 else ms[-1:]:
                shapes = SHAPES if bucket != "large" else [(4096, 4096), (14336, 4096), (4096, 14336)]
                if not w4a4:
                    shapes = [(4096, 4096), (14336, 4096)]
                pts += [(a_bits, w_bits, bucket, m, n, k) for n, k in shapes]
    return pts


def _precompile_task(task):
    """Pool worker: compile (and run once) one candidate on a tiny M, filling Triton's on-disk cache."""
    a_bits, w_bits, cfg, m, n, k, out_dtype = task
    try:
        dev = "cuda"
        xq = rand_packed(m, k, dev) if a_bits == 4 else rand_int8(m, k, dev)
        wq = rand_packed(n, k, dev) if w_bits == 4 else rand_int8(n, k, dev)
        int_linear_with_config(xq, torch.ones(1, device=dev), wq, torch.ones(n, device=dev), None, a_bits, w_bits,
                               out_dtype, cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{cfg}: {type(e).__name__}: {str(e)[:200]}"


def precompile(tasks, workers=12):
    import multiprocessing as mp
    seen, uniq = set(), []
    for t in tasks:
        a, w, cfg, m, n, k, dt = t
        key = (a, w, cfg.kind, cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.group_m,
               cfg.split_k > 1, cfg.split_nibbles, k % cfg.block_k == 0, dt)
        if key not in seen:
            seen.add(key)
            uniq.append(t)
    log(f"precompiling {len(uniq)} kernels on {workers} processes")
    with mp.get_context("spawn").Pool(workers) as pool:
        errs = [e for e in pool.map(_precompile_task, uniq, chunksize=1) if e]
    for e in errs:
        log("precompile error:", e)
    log("precompile done")


def tune(dev, bits_list, deadline, records):
    pts = tune_points(bits_list)
    tasks = []
    for a_bits, w_bits, bucket, m, n, k in pts:
        for cand in candidates(bucket, a_bits, w_bits):
            cfg = resolve(cand, m, n, k, w_bits)
            tasks.append((a_bits, w_bits, cfg, min(m, 16) if cfg.kind == "mma" else m, n, k, torch.bfloat16))
            tasks.append((a_bits, w_bits, cfg, min(m, 16) if cfg.kind == "mma" else m, n, k, torch.float32))
    precompile(tasks)
    scores = {}
    checked = set()
    for a_bits, w_bits, bucket, m, n, k in pts:
        if time.time() > deadline:
            log("tuning deadline reached")
            break
        for i, cand in enumerate(candidates(bucket, a_bits, w_bits)):
            cfg = resolve(cand, m, n, k, w_bits)
            rec = dict(bits=f"W{w_bits}A{a_bits}", bucket=bucket, m=m, n=n, k=k, cfg=str(cfg))
            key = (a_bits, w_bits, bucket, i)
            try:
                if key not in checked:  # exact integers, once per candidate (the GPU tests cover the shapes)
                    rec["exact"] = check_exact(cfg, m, n, k, a_bits, w_bits, dev)
                    checked.add(key)
                    if not rec["exact"]:
                        raise RuntimeError("integer results differ from the reference")
                calls, per_call, _ = _ours(m, n, k, dev, a_bits, w_bits, False, lambda *a, c=cfg: c)
                ms_t, _ = time_calls(calls)
                del calls
                rec.update(us=ms_t * 1e3, tops=2 * m * n * k / ms_t / 1e9, gbps_w=n * k * w_bits / 8 / ms_t / 1e6)
                scores.setdefault(key, []).append(ms_t)
            except Exception as e:  # noqa: BLE001
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                scores.setdefault(key, []).append(float("inf"))
            records.append(rec)
            log("tune", rec["bits"], bucket, m, n, k, cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                cfg.num_stages, cfg.split_k, int(cfg.split_nibbles),
                f"{rec.get('us', float('nan')):.1f}us {rec.get('tops', 0):.0f}TOPS {rec.get('gbps_w', 0):.0f}GB/s",
                rec.get("error", "")[:150])
    table = {}
    for a_bits, w_bits in bits_list:
        for bucket in BUCKETS:
            keys = [kk for kk in scores if kk[:3] == (a_bits, w_bits, bucket)]
            if not keys:
                continue
            n_pts = max(len(scores[kk]) for kk in keys)
            full = [kk for kk in keys if len(scores[kk]) == n_pts and all(math.isfinite(t) for t in scores[kk])]
            if not full:
                continue
            best = min(full, key=lambda kk: sum(math.log(t) for t in scores[kk]))
            table[(bucket, a_bits, w_bits)] = candidates(bucket, a_bits, w_bits)[best[3]]
            log("BEST", bucket, f"W{w_bits}A{a_bits}", table[(bucket, a_bits, w_bits)])
    return table


# ----------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-budget-s", type=float, default=200)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--ms", default="", help="comma-separated M values (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_")
    info = dict(date=DATE, device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                sms=torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        import torchao
        info["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        info["torchao"] = f"unavailable: {e}"
    log(info)
    result = dict(info=info, ceilings=ceilings(dev), tuning=[], table={}, rows=[])
    log("ceilings", result["ceilings"])
    json_path = out_dir / f"linear_{'h100' if 'H100' in name else name.lower()}{args.tag}.json"

    def dump():
        json_path.write_text(json.dumps(result, indent=1, default=str))

    table = {}
    if args.tune:
        table = tune(dev, [(4, 4), (8, 4), (8, 8)], time.time() + args.tune_budget_s, result["tuning"])
        result["table"] = {f"{b}/W{w}A{a}": str(c) for (b, a, w), c in table.items()}
        dump()

    def cfg_for(m, n, k, a_bits, w_bits):
        b = bucket_of(m, k, a_bits, w_bits)
        c = table.get((b, a_bits, w_bits))
        if c is None and (a_bits, w_bits) != (4, 4) and b not in ("large", "gemv"):
            c = table.get((b, 4, 4))
        if c is None:
            return pick_config(m, n, k, a_bits, w_bits)
        return resolve(c, m, n, k, w_bits)

    methods = [mm for mm in args.methods.split(",") if mm in METHODS]
    ms_list = [1, 16, 2048, 8192] if args.quick else MS
    if args.ms:
        ms_list = [int(v) for v in args.ms.split(",")]
    deadline = time.time() + args.budget_s
    for n, k in SHAPES:
        for m in ms_list:
            for meth in methods:
                if time.time() > deadline:
                    log("bench deadline reached")
                    break
                row = dict(n=n, k=k, m=m, method=meth)
                try:
                    calls, per_call, note = METHODS[meth](m, n, k, dev, cfg_for)
                    ms_t, graphed = time_calls(calls, graph=(meth != "torchao_int8dyn"))
                    del calls
                    row.update(us=ms_t * 1e3, tops=2 * m * n * k / ms_t / 1e9, note=note, graph=graphed,
                               gbps=per_call / ms_t / 1e6)
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                    if os.environ.get("PQ_BENCH_TRACE"):
                        traceback.print_exc()
                result["rows"].append(row)
                log(f"{n}x{k} M={m:5d} {meth:20s}",
                    f"{row['us']:9.1f} us {row['tops']:7.1f} TOPS" if "us" in row else row["error"][:150])
                torch.cuda.empty_cache()
        dump()
    dump()
    md = markdown(result)
    (out_dir / json_path.name.replace(".json", ".md")).write_text(md)
    print(md)


def markdown(result):
    rows = [r for r in result["rows"] if "us" in r]
    by = {(r["n"], r["k"], r["m"], r["method"]): r for r in rows}
    c = result["ceilings"]
    info = result["info"]
    lines = [
        f"Device: {info['device']}, torch {info['torch']}, triton {info['triton']}, torchao {info.get('torchao')}, "
        f"{info['date']}. Ceilings measured in the same run: copy {c['copy_TBps']:.2f} TB/s, bf16 "
        f"{c['bf16_TFLOPs']:.0f} TFLOP/s, int8 _int_mm {c['int8_int_mm_TOPs']:.0f} TOP/s, fp8 _scaled_mm "
        f"{c['fp8_scaled_mm_TFLOPs']:.0f} TFLOP/s (8192^3).",
        "",
        "Times in us (CUDA-graph replays over rotated inputs, median). `x bf16` = speedup over bf16 F.linear.",
        "",
    ]
    meths = list(METHODS)
    for n, k in SHAPES:
        lines.append(f"**N={n}, K={k}**")
        lines.append("")
        lines.append("| M | " + " | ".join(meths) + " | W4A4 lin x bf16 | W4A4 GEMM TOPS (% int8 ceil) | "
                     "static/dyn | W4A4 weight GB/s (% copy) |")
        lines.append("|" + "---|" * (len(meths) + 5))
        for m in MS:
            cells = []
            for meth in meths:
                r = by.get((n, k, m, meth))
                cells.append(f"{r['us']:.1f}" if r else "-")
            bf, lin, gemm, dyn = (by.get((n, k, m, x)) for x in ("bf16", "w4a4_linear", "w4a4_gemm",
                                                               "quarot_w4a4_linear"))
            sp = f"{bf['us'] / lin['us']:.2f}x" if bf and lin else "-"
            tops = (f"{gemm['tops']:.0f} ({100 * gemm['tops'] / c['int8_int_mm_TOPs']:.0f}%)" if gemm else "-")
            sd = f"{dyn['us'] / lin['us']:.2f}x" if dyn and lin else "-"
            gb = n * k / 2 / (lin["us"] * 1e-6) / 1e9 if lin else None
            gbs = f"{gb:.0f} ({100 * gb / (c['copy_TBps'] * 1e3):.0f}%)" if gb else "-"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {sp} | {tops} | {sd} | {gbs} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
