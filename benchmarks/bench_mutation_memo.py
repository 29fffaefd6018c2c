"""Compile-time cost of inductor's mutation analysis for our kernels, with and without `mutation_memo`, on the CPU.

AOTAutograd (the stage of torch.compile / AOTI that decomposes our triton_ops into kernel launches) traces
`--layers` Llama-3-8B-shaped MLP+projection layers of pq_ao ops (static W4A4: quantize, int GEMMs, fused
Hadamard+quantize; attention left out) at M tokens, on fake CUDA tensors; torch's analysis builds TTIR for sm_90
through a stand-in driver, so no GPU is needed. Counted: kernel launches in the graph (six per layer: the unused
projections are dropped), TTIR analyses run, trace seconds. Inductor's lowering asks again per launch (up to 3
more times in torch 2.11); that part needs a GPU.

    python3 benchmarks/bench_mutation_memo.py --json results/mutation_memo_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton


def trace(layers: int, m: int, memo: bool) -> dict:
    from functorch.compile import aot_function
    from torch._higher_order_ops import triton_kernel_wrap as twrap
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pq_ao.hadamard import hadamard_factor
    from pq_ao.kernels.triton import mutation_memo

    name = next(n for n in mutation_memo.ANALYSES if hasattr(twrap, n))
    installed = getattr(twrap, name)
    torchs = getattr(installed, "__wrapped__", installed)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torchs(*args, **kwargs)

    setattr(twrap, name, mutation_memo.memoized(counted) if memo else counted)
    ops = torch.ops.pq_ao
    had = hadamard_factor(14336)[1]

    def stack(x, s, w_qkv, w_o, w_up, w_down, ws_qkv, ws_o, ws_up, ws_down, had):
        for _ in range(layers):
            ops.int_linear(ops.quantize_static(x, s, 4), s, w_qkv, ws_qkv, None, 4, 4, torch.bfloat16)
            x = ops.int_linear(ops.quantize_static(x, s, 4), s, w_o, ws_o, None, 4, 4, torch.bfloat16)
            xq = ops.quantize_static(x, s, 4)
            gate = ops.int_linear(xq, s, w_up, ws_up, None, 4, 4, torch.bfloat16)
            ops.int_linear(xq, s, w_up, ws_up, None, 4, 4, torch.bfloat16)
            x = ops.int_linear(ops.hadamard_quantize_static(gate, had, s, 4), s, w_down, ws_down, None, 4, 4,
                               torch.bfloat16)  # fmt: skip
        return x

    graphs = []
    try:
        with FakeTensorMode(), torch.no_grad():
            u8 = lambda n, k: torch.empty(n, k // 2, dtype=torch.uint8, device="cuda")  # noqa: E731
            f32 = lambda *shape: torch.empty(*shape, device="cuda")  # noqa: E731
            args = (torch.empty(m, 4096, dtype=torch.bfloat16, device="cuda"), f32(1), u8(6144, 4096),
                    u8(4096, 4096), u8(14336, 4096), u8(4096, 14336), f32(6144), f32(4096), f32(14336), f32(4096),
                    torch.empty(had.shape, dtype=had.dtype, device="cuda"))  # fmt: skip
            t = time.perf_counter()
            aot_function(stack, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
            seconds = time.perf_counter() - t
    finally:
        setattr(twrap, name, installed)
    launches = sum(1 for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target))
    return {"memo": memo, "layers": layers, "m": m, "launches": launches, "ttir_analyses": len(calls),
            "trace_s": seconds}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels" / "triton"))
    from pq_triton_offline import sm90_driver  # the stand-in sm_90 driver of the tests

    with sm90_driver():
        rows = [trace(args.layers, args.m, memo) for memo in (False, True)]
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
              "cpu": platform.processor() or platform.machine(), "rows": rows}  # fmt: skip
    print("| memo | launches | TTIR analyses | AOTAutograd trace s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['memo'] else 'off'} | {r['launches']} | {r['ttir_analyses']} | {r['trace_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
