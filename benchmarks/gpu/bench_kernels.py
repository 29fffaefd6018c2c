"""GPU box: bandwidth of the memory-bound kernels (static / dynamic quantize, online Hadamard alone and fused with
quantization) against the device copy bandwidth, plus the plain-torch transform for scale.

    PYTHONPATH=. python benchmarks/gpu/bench_kernels.py --out $OUT [--row-loops 2:8:16,1:16:16,0:8:32]

`--row-loops` times the Hadamard kernels' row loop (rows longer than 128 elements) at each setting
`programs_per_sm:warps:block_c` of `hadamard.ROW_LOOP` (programs_per_sm 0 = one program per row) and records the
fraction of output bytes that differ from the first setting's (0 for the same block_c; a few boundary flips else).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import copy_tbps, timed  # noqa: E402

from pq_ao import hadamard  # noqa: E402
from pq_ao.kernels import triton as tk  # noqa: E402
from pq_ao.kernels.triton import hadamard as tk_hadamard  # noqa: E402

HADAMARD = ("hadamard_quantize_int4", "hadamard_quantize_e4m3_gated", "hadamard_bf16")


def _set_row_loop(setting: str) -> None:
    """`programs_per_sm:warps:block_c` into the Hadamard row loop's settings; 0 programs = one per row."""
    per_sm, warps, block_c = (int(v) for v in setting.split(":"))
    tk_hadamard.ROW_LOOP.update(programs_per_sm=per_sm or 10**9, warps=warps, block_c=block_c)


# decode GEMV shapes (N, K) of Llama-3-8B: fused q/k/v, o_proj, fused gate/up, down_proj
GEMV_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def gemv_sweep(args) -> None:
    """M = 1 (batch-1 decode) W4A4 GEMV at each `gemm.GEMV` setting: `static_linear` from bf16 activations (the
    quantize in the GEMV, as q/k/v and gate/up run) and `int_linear` from packed int4 codes (o/down, after the
    Hadamard kernel), in µs and as a fraction of the copy bandwidth on the int4 weight bytes. Every setting's output
    is compared with the first's (the same integer sums: 0 differing)."""
    from harness import act, rand_packed

    from pq_ao.kernels.triton import gemm

    dev = "cuda"
    copy = copy_tbps(dev)
    print(f"copy {copy:.2f} TB/s; triton {triton.__version__}, torch {torch.__version__}")
    rows = []
    default_bn = gemm.GEMV["block_n"]
    for n, k in GEMV_SHAPES:
        ws = torch.rand(n, device=dev) * 0.01 + 1e-3
        xs = torch.tensor([0.05], device=dev)
        torch.manual_seed(n + k)
        w_fixed, x_fixed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev), act(1, k, dev)
        xq_fixed = torch.randint(0, 256, (1, k // 2), dtype=torch.uint8, device=dev)
        for kind in ("static_linear", "int_linear"):
            first = None
            for setting in args.gemv.split(","):
                bn, bk, warps, per_sm = (int(v) for v in setting.split(":"))
                gemm.GEMV.update(block_n=(bn,) if bn else default_bn, block_k=bk, warps=warps, per_sm=per_sm)
                if kind == "static_linear":
                    def make(i):
                        w, x = rand_packed(n, k, dev), act(1, k, dev)
                        return lambda: tk.static_linear(x, xs, None, w, ws, None, 4, 4, torch.bfloat16)
                    check = lambda: tk.static_linear(x_fixed, xs, None, w_fixed, ws, None, 4, 4, torch.float32)  # noqa: E731
                else:
                    def make(i):
                        w, x = rand_packed(n, k, dev), rand_packed(1, k, dev)
                        return lambda: tk.int_linear(x, xs, w, ws, None, 4, 4, torch.bfloat16)
                    check = lambda: tk.int_linear(xq_fixed, xs, w_fixed, ws, None, 4, 4, torch.float32)  # noqa: E731
                row = dict(kernel=f"gemv_{kind}", n=n, k=k, gemv=setting)
                try:
                    ms = timed(make, n * k // 2)
                    gbs = n * k / 2 / ms / 1e6
                    out = check()
                    first = out if first is None else first
                    row.update(us=ms * 1e3, gbps=gbs, pct_copy=100 * gbs / (copy * 1e3),
                               differing_from_first=float((out != first).float().mean()))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(f"gemv {kind:13s} N={n:5d} K={k:5d} {setting:16s}",
                      f"{row['us']:7.1f} us {row['pct_copy']:5.1f}% of copy diff {row['differing_from_first']}"
                      if "us" in row else row["error"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gemv.json").write_text(json.dumps(dict(copy_TBps=copy, rows=rows), indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    default = "{programs_per_sm}:{warps}:{block_c}".format(**tk_hadamard.ROW_LOOP)
    ap.add_argument("--row-loops", default=default)
    ap.add_argument("--ms", default="1,2048,8192", help="row counts to time")
    ap.add_argument("--ks", default="4096,14336", help="row lengths to time")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated names; default all)")
    ap.add_argument("--gemv", default="", help="decode GEMV settings to time instead, block_n:block_k:warps:per_sm "
                    "(gemm.GEMV; block_n 0: its choice by N), comma-separated; e.g. 0:1024:4:3,16:1024:4:3")
    args = ap.parse_args()
    if args.gemv:
        return gemv_sweep(args)
    settings = args.row_loops.split(",")
    dev = "cuda"
    copy = copy_tbps(dev)
    rows = []
    print(f"copy {copy:.2f} TB/s; triton {triton.__version__}, torch {torch.__version__}")
    only = set(filter(None, args.kernels.split(",")))
    for k in (int(v) for v in args.ks.split(",")):
        kh, had_k = hadamard.hadamard_factor(k)
        hk = had_k.float().to(dev)
        for m in (int(v) for v in args.ms.split(",")):
            s = torch.tensor([0.05], device=dev)
            cases = {
                "quantize_static_int4": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                  tk.quantize_static(x, s, 4)), m * k * 2.5),
                "quantize_static_int8": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                  tk.quantize_static(x, s, 8)), m * k * 3),
                "quantize_dynamic_int4": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                   tk.quantize_dynamic(x, 4)), m * k * 2.5 + m * 4),
                "hadamard_quantize_int4": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                    tk.hadamard_quantize_static(x, hk, s, 4)), m * k * 2.5),
                "hadamard_quantize_e4m3_gated": (lambda i: (lambda x=torch.randn(m, 2 * k, device=dev, dtype=torch.bfloat16):
                                                          tk_hadamard.hadamard_quantize_static_e4m3(x, hk, s, gated=True)),
                                                 m * k * 5),
                "hadamard_bf16": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                           tk.hadamard_transform(x, hk)), m * k * 4),
                "torch_hadamard_fp32_ref": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                     hadamard.hadamard_transform(x, hk)), m * k * 4),
                "torch_add_bf16_baseline": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                     x.add_(1.0)), m * k * 4),
            }
            for name, (make, nbytes) in cases.items():
                if only and name not in only:
                    continue
                first = None
                for setting in settings if name in HADAMARD else [None]:
                    if setting is not None:
                        _set_row_loop(setting)
                    row = dict(kernel=name, m=m, k=k, row_loop=setting)
                    try:
                        ms = timed(make, nbytes, graph=(name != "torch_hadamard_fp32_ref"))
                        gbs = nbytes / ms / 1e6
                        row.update(us=ms * 1e3, gbps=gbs, pct_copy=100 * gbs / (copy * 1e3))
                        if setting is not None and len(settings) > 1:
                            torch.manual_seed(1234)  # the same input for every setting
                            out = make(0)().view(torch.uint8)
                            first = out if first is None else first
                            row["bytes_differing_from_first"] = float((out != first).float().mean())
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(f"{name:28s} M={m:5d} K={k:5d} row_loop={setting}",
                          f"{row['us']:8.1f} us {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}% of copy "
                          f"{row.get('bytes_differing_from_first', '')}" if "us" in row else row["error"], flush=True)
            _set_row_loop(settings[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_quant_hadamard.json").write_text(json.dumps(dict(copy_TBps=copy, rows=rows), indent=1))


if __name__ == "__main__":
    main()
