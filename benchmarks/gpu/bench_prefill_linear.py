"""GPU box: the static W4A4 linear as the model runs it (`pq_ao::static_linear`, bf16 in -> bf16 out, quantization
and the online Hadamard included) on each of its paths, against bf16 cuBLAS and torchao's fp8-row linear, at
Llama-3-8B shapes and prefill row counts; plus the checks that the fp8 path is exact.

    PYTHONPATH=. python3 benchmarks/gpu/bench_prefill_linear.py --json $OUT/prefill_linear.json

1. Exactness: e4m3 codes x widened int4 weights through `_scaled_mm` (unit scales, fp32 out) equal the reference
   integers (random and extreme operands, K 4096 and 14336); `static_linear` on the fp8 path is within one bf16
   rounding of the reference, on random shapes with ragged M, with and without the online Hadamard.
2. Times (CUDA graph of R calls over R input sets, > 3x L2, median of do_bench, / R; `benchmarks/harness.py`):
   `bf16` (F.linear), `torchao_fp8row` (Float8DynamicActivationFloat8WeightConfig(PerRow), torch.compile'd),
   `fp8_gemm` (`_scaled_mm` rowwise alone, pre-quantized), `pq_int` (static_linear on the int4 Triton path),
   `pq_fp8` (static_linear on the fp8 path), `widen` (the weight widening alone), `hadamard_q` (down_proj's
   Hadamard + quantize to e4m3 alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness as bl  # noqa: E402
from harness import act, log, rand_packed, randf, rotations, time_calls  # noqa: E402

from pq_ao import quant_math  # noqa: E402
from pq_ao.hadamard import hadamard_factor  # noqa: E402
from pq_ao.kernels import reference  # noqa: E402
from pq_ao.kernels.triton import fp8_linear, hadamard, linear  # noqa: E402

DEV = "cuda"
# (N, K, online Hadamard): q/o, k/v, gate/up, fused gate+up, down (R4: 14336 = 28 x 512)
# (N, K, online Hadamard): o_proj, k/v, gate or up, down; 6144 and 28672 are the fused q/k/v and gate/up the model runs
SHAPES = [(4096, 4096, False), (1024, 4096, False), (14336, 4096, False), (6144, 4096, False), (28672, 4096, False),
          (4096, 14336, True)]
MS = [512, 1024, 2048, 8192]
TORCHAO_MS = (2048, 8192)  # each shape is a compile: the peer at the prefill sizes only


def exactness() -> list:
    out = []
    for k in (4096, 14336):
        for kind in ("random", "extreme"):
            m, n = 256, 512
            if kind == "random":
                q = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8)
                wq = rand_packed(n, k, DEV)
            else:
                q = torch.full((m, k), -8, device=DEV, dtype=torch.int8)
                wq = torch.full((n, k // 2), 0x88, device=DEV, dtype=torch.uint8)
            one = torch.ones((), device=DEV)
            got = torch._scaled_mm(q.float().to(torch.float8_e4m3fn), fp8_linear.widen_int4_e4m3(wq).t(),
                                   scale_a=one, scale_b=one, out_dtype=torch.float32).cpu()
            want = reference.int_linear(q.cpu(), torch.ones(1), wq.cpu(), torch.ones(n), None, 8, 4, torch.float32)
            out.append(dict(k=k, kind=kind, exact=bool(torch.equal(got, want)),
                            max_abs_err=float((got - want).abs().max())))
            log("exact", out[-1])
    return out


def op_correctness() -> list:
    res = []
    g = torch.Generator().manual_seed(int(time.time()))
    for m, n, k, had in [(512, 576, 576, False), (700, 1536, 576, False), (513, 576, 1536, True),
                         (1000, 4096, 14336, True), (2048, 1024, 4096, False), (777, 4096, 4096, True)]:
        x = (torch.randn(m, k, generator=g) * 2).bfloat16()
        hk = hadamard_factor(k)[1].float() if had else None
        s = torch.tensor([float(x.float().abs().max()) / 7.5 * 0.6])
        w = torch.randn(n, k, generator=g)
        ws = quant_math.per_channel_scale(w, 4)
        wq = quant_math.pack_int4(quant_math.quantize(w, ws[:, None], 4))
        bias = torch.randn(n, generator=g).bfloat16()
        xq = reference.hadamard_quantize_static(x, hk, s, 4) if had else reference.quantize_static(x, s, 4)
        want32 = reference.int_linear(xq, s, wq, ws, bias, 4, 4, torch.float32)
        want = want32.bfloat16()
        got = linear.static_linear(x.to(DEV), s.to(DEV), None if hk is None else hk.to(DEV), wq.to(DEV), ws.to(DEV),
                                   bias.to(DEV), 4, 4, torch.bfloat16).cpu()
        # one bf16 rounding of the fp32 result: |got - want32| <= 1 bf16 ulp of |want32|
        ulp = want32.abs().clamp_min(1e-30).log2().floor().exp2() * 2**-7
        bad = (got.float() - want32).abs() > ulp * 1.0001
        codes = (hadamard.hadamard_quantize_static_e4m3(x.to(DEV), hk.to(DEV), s.to(DEV)) if had else
                 fp8_linear_codes(x, s)).float().cpu()
        codes_ok = bool(torch.equal(codes, quant_math.unpack_int4(xq).float()))
        res.append(dict(m=m, n=n, k=k, hadamard=had, codes_exact=codes_ok, beyond_one_rounding=int(bad.sum()),
                        equal_to_reference=float((got == want).float().mean())))
        log("op", res[-1])
    return res


def fp8_linear_codes(x, s):
    from pq_ao.kernels.triton.quant import quantize_static_e4m3

    return quantize_static_e4m3(x.to(DEV), s.to(DEV))


def m_static(m, n, k, had, force):
    hk = hadamard_factor(k)[1].float().to(DEV) if had else None
    ws = randf(n) * 0.01 + 1e-3
    calls = []
    old = fp8_linear.FP8_MIN_M
    fp8_linear.FP8_MIN_M = 1 if force == "fp8" else 10**9
    try:
        for _ in range(rotations(n * k // 2 + 4 * m * k + 2 * m * n)):
            x, wq, xs = act(m, k, DEV), rand_packed(n, k, DEV), randf(1) * 0.1 + 0.01
            calls.append(lambda x=x, wq=wq, xs=xs: linear.static_linear(x, xs, hk, wq, ws, None, 4, 4, torch.bfloat16))
        for c in calls:  # the path is chosen at call time: warm up under the forced threshold
            c()
        t, _ = time_calls(calls)
    finally:
        fp8_linear.FP8_MIN_M = old
    return t


def m_bf16(m, n, k):
    calls = []
    for _ in range(rotations(2 * (n * k + m * k + m * n))):
        x, w = act(m, k, DEV), torch.randn(n, k, device=DEV, dtype=torch.bfloat16, generator=bl.gen()) * 0.02
        calls.append(lambda x=x, w=w: F.linear(x, w))
    return time_calls(calls)[0]


def m_fp8_gemm(m, n, k):
    calls = []
    for _ in range(rotations(n * k + m * k + 2 * m * n)):
        x8 = torch.randn(m, k, device=DEV, generator=bl.gen()).to(torch.float8_e4m3fn)
        w8 = torch.randn(n, k, device=DEV, generator=bl.gen()).to(torch.float8_e4m3fn)
        sa, sb = randf(m, 1) + 0.5, randf(1, n) + 0.5
        calls.append(lambda x8=x8, w8=w8, sa=sa, sb=sb: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb,
                                                                         out_dtype=torch.bfloat16))
    return time_calls(calls)[0]


def m_torchao(m, n, k):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    calls = []
    fn = torch.compile(lambda lin, x: lin(x), fullgraph=True, dynamic=False)
    for _ in range(rotations(n * k + 2 * m * k + 2 * m * n, cap=8)):
        lin = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
        quantize_(lin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        x = act(m, k, DEV)
        calls.append(lambda lin=lin, x=x: fn(lin, x))
    return time_calls(calls)[0]


def m_widen(n, k):
    calls = []
    for _ in range(rotations(3 * n * k // 2)):
        wq = rand_packed(n, k, DEV)
        calls.append(lambda wq=wq: fp8_linear.widen_int4_e4m3(wq))
    return time_calls(calls)[0]


def m_hadamard_q(m, k):
    hk = hadamard_factor(k)[1].float().to(DEV)
    calls = []
    for _ in range(rotations(3 * m * k)):
        x, xs = act(m, k, DEV), randf(1) * 0.1 + 0.01
        calls.append(lambda x=x, xs=xs: hadamard.hadamard_quantize_static_e4m3(x, hk, xs))
    return time_calls(calls)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.recompile_limit = 256
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
               date=time.strftime("%Y-%m-%d"), host=platform.node(), fp8_min_m=fp8_linear.FP8_MIN_M)
    try:
        import torchao
        res["torchao"] = torchao.__version__
    except ImportError:
        pass
    path = Path(args.json)

    def save():
        path.write_text(json.dumps(res, indent=1, default=str))

    res["ceilings"] = bl.ceilings(DEV)
    log("ceilings", res["ceilings"])
    res["exactness"] = exactness()
    res["op_correctness"] = op_correctness()
    save()
    rows = []
    for n, k, had in SHAPES:
        row0 = dict(n=n, k=k, hadamard=had, widen_us=m_widen(n, k) * 1e3)
        log("widen", n, k, f"{row0['widen_us']:.1f} us", f"{3 * n * k / 2 / row0['widen_us'] / 1e6:.2f} TB/s")
        for m in map(int, args.ms.split(",")):
            row = dict(row0, m=m)
            for name, fn in (("bf16", lambda: m_bf16(m, n, k)),
                             ("torchao_fp8row", lambda: m_torchao(m, n, k) if m in TORCHAO_MS else None),
                             ("fp8_gemm", lambda: m_fp8_gemm(m, n, k)), ("pq_int", lambda: m_static(m, n, k, had, "int")),
                             ("pq_fp8", lambda: m_static(m, n, k, had, "fp8"))):
                try:
                    t = fn()
                    row[name] = None if t is None else t * 1e3
                except Exception as e:  # noqa: BLE001
                    row[name] = None
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log("error", name, m, n, k, row[name + "_error"])
            if had:
                row["hadamard_q_us"] = m_hadamard_q(m, k) * 1e3
            rows.append(row)
            bf = row["bf16"]
            log(f"M={m} {n}x{k}{' +H' if had else ''}: " + " ".join(
                f"{nm}={row[nm]:.0f}us({bf / row[nm]:.2f}x)" for nm in ("bf16", "torchao_fp8row", "fp8_gemm", "pq_int",
                                                                      "pq_fp8") if row.get(nm)))
            res["rows"] = rows
            save()
    print("\n| M | N x K | bf16 us | torchao fp8-row | fp8 GEMM alone | pq int4 path | pq fp8 path | widen us |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def c(nm):
            return f"{r[nm]:.0f} ({r['bf16'] / r[nm]:.2f}x)" if r.get(nm) else "err"
        print(f"| {r['m']} | {r['n']}x{r['k']}{' +H' if r['hadamard'] else ''} | {r['bf16']:.0f} | {c('torchao_fp8row')} | "
              f"{c('fp8_gemm')} | {c('pq_int')} | {c('pq_fp8')} | {r['widen_us']:.1f} |")


if __name__ == "__main__":
    main()
