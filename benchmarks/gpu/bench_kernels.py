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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    default = "{programs_per_sm}:{warps}:{block_c}".format(**tk_hadamard.ROW_LOOP)
    ap.add_argument("--row-loops", default=default)
    ap.add_argument("--ms", default="1,2048,8192", help="row counts to time")
    ap.add_argument("--ks", default="4096,14336", help="row lengths to time")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated names; default all)")
    args = ap.parse_args()
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
