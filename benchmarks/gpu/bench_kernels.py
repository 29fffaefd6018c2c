"""GPU box: bandwidth of the memory-bound kernels (static / dynamic quantize, online Hadamard alone and fused with
quantization) against the device copy bandwidth, plus the plain-torch transform for scale.

    PYTHONPATH=. python benchmarks/gpu/bench_kernels.py --out $OUT [--programs-per-sm 1,2,0]

`--programs-per-sm` times the Hadamard kernels' row loop (rows longer than 128 elements) at each grid size
(`PROGRAMS_PER_SM`; 0 = one program per row, the grid before the loop) and checks every size gives the same bytes.
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


def _set_grid(per_sm: int) -> None:
    """The Hadamard row loop's programs per multiprocessor; 0 = one program per row (a count no M reaches)."""
    tk_hadamard.PROGRAMS_PER_SM = per_sm or 10**9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--programs-per-sm", default=str(tk_hadamard.PROGRAMS_PER_SM))
    args = ap.parse_args()
    grids = [int(v) for v in args.programs_per_sm.split(",")]
    dev = "cuda"
    copy = copy_tbps(dev)
    rows = []
    print(f"copy {copy:.2f} TB/s; triton {triton.__version__}, torch {torch.__version__}")
    for k in (4096, 14336):
        kh, had_k = hadamard.hadamard_factor(k)
        hk = had_k.float().to(dev)
        for m in (1, 2048, 8192):
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
                for per_sm in grids if name in HADAMARD else [None]:
                    if per_sm is not None:
                        _set_grid(per_sm)
                    row = dict(kernel=name, m=m, k=k, programs_per_sm=per_sm)
                    try:
                        ms = timed(make, nbytes, graph=(name != "torch_hadamard_fp32_ref"))
                        gbs = nbytes / ms / 1e6
                        row.update(us=ms * 1e3, gbps=gbs, pct_copy=100 * gbs / (copy * 1e3))
                        if per_sm is not None and len(grids) > 1:
                            row["same_as_one_program_per_row"] = _same_bytes(make)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(f"{name:28s} M={m:5d} K={k:5d} grid={per_sm}",
                          f"{row['us']:8.1f} us {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}% of copy "
                          f"{row.get('same_as_one_program_per_row', '')}" if "us" in row else row["error"], flush=True)
            _set_grid(grids[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_quant_hadamard.json").write_text(json.dumps(dict(copy_TBps=copy, rows=rows), indent=1))


def _same_bytes(make) -> bool:
    """The kernel's output at the current grid equals the one-program-per-row grid's, byte for byte."""
    fn = make(0)
    got = fn()
    saved = tk_hadamard.PROGRAMS_PER_SM
    _set_grid(0)
    try:
        want = fn()
    finally:
        tk_hadamard.PROGRAMS_PER_SM = saved
    return bool(torch.equal(got.view(torch.uint8), want.view(torch.uint8)))


if __name__ == "__main__":
    main()
