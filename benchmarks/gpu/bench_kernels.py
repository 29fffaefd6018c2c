"""GPU box: bandwidth of the memory-bound kernels (static / dynamic quantize, online Hadamard alone and fused with
quantization) against the device copy bandwidth, plus the plain-torch transform for scale.

    PYTHONPATH=. python benchmarks/gpu/bench_kernels.py --out $OUT
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
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
                "hadamard_bf16": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                           tk.hadamard_transform(x, hk)), m * k * 4),
                "torch_hadamard_fp32_ref": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                     hadamard.hadamard_transform(x, hk)), m * k * 4),
                "torch_add_bf16_baseline": (lambda i: (lambda x=torch.randn(m, k, device=dev, dtype=torch.bfloat16):
                                                     x.add_(1.0)), m * k * 4),
            }
            for name, (make, nbytes) in cases.items():
                try:
                    ms = timed(make, nbytes, graph=(name != "torch_hadamard_fp32_ref"))
                    gbs = nbytes / ms / 1e6
                    row = dict(kernel=name, m=m, k=k, us=ms * 1e3, gbps=gbs, pct_copy=100 * gbs / (copy * 1e3))
                except Exception as e:  # noqa: BLE001
                    row = dict(kernel=name, m=m, k=k, error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                print(f"{name:26s} M={m:5d} K={k:5d}",
                      f"{row['us']:8.1f} us {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}% of copy" if "us" in row
                      else row["error"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_quant_hadamard.json").write_text(json.dumps(dict(copy_TBps=copy, rows=rows), indent=1))


if __name__ == "__main__":
    main()
