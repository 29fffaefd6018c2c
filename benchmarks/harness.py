"""The GPU timing harness every benchmark here uses (one copy of it).

`time_calls(calls)`: median ms per call of a list of zero-argument callables, one per input set, replayed as one
CUDA graph (no launch gaps), after a warm-up; `timed(make, bytes_per_call)` builds that list with enough input
sets (`rotations`) that one replay touches more than 3x the L2 (no cache flattery). Data are random, never zeros.
`ceilings()` measures the roofs of the run: device copy, bf16 / int8 / fp8 matrix products at 8192^3.
"""

from __future__ import annotations

import math
import time

import torch
from triton.testing import do_bench

L2_BYTES = 60 * 2**20  # the H200 reports 60 MB (the H100 50): the larger keeps > 3x on both

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def rotations(bytes_per_call: int, cap: int = 16) -> int:
    """Input sets per replay so that one replay moves > 3x the L2."""
    return int(min(cap, max(1, math.ceil(3 * L2_BYTES / max(1, bytes_per_call)))))


def time_calls(calls, graph: bool = True) -> tuple[float, bool]:
    """(median ms per call, whether a CUDA graph was used) of a list of zero-arg callables (one per input set)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
            ms = do_bench(g.replay, warmup=20, rep=80, return_mode="median")
            del g
            return ms / len(calls), True
        except Exception as e:  # noqa: BLE001
            log("graph capture failed, timing eagerly:", type(e).__name__, str(e)[:200])
            _GEN[0] = None
            torch.cuda.synchronize()

    def run_all():
        for c in calls:
            c()

    return do_bench(run_all, warmup=20, rep=80, return_mode="median") / len(calls), False


def timed(make, bytes_per_call: int, graph: bool = True, cap: int = 16) -> float:
    """Median ms of one call of `make(i)` (i = 0 .. R-1, each on its own inputs), as `time_calls` times it."""
    return time_calls([make(i) for i in range(rotations(bytes_per_call, cap))], graph)[0]


# ----------------------------------------------------------------------------------------------------------------
# data

_GEN = [None]


def gen():
    """Data generator, replaced after a failed graph capture (which can leave the default CUDA RNG unusable)."""
    if _GEN[0] is None:
        _GEN[0] = torch.Generator(device="cuda").manual_seed(int(time.time()))
    return _GEN[0]


def rand_packed(rows, k, dev):
    return torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, device=dev, generator=gen())


def rand_int8(rows, k, dev, lo=-128, hi=128):
    return torch.randint(lo, hi, (rows, k), dtype=torch.int8, device=dev, generator=gen())


def act(m, k, dev):
    return torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen())


def randf(*shape, dev="cuda"):
    return torch.rand(*shape, device=dev, generator=gen())


# ----------------------------------------------------------------------------------------------------------------
# ceilings


def copy_tbps(dev: str = "cuda") -> float:
    """Device-to-device copy of 1 GiB of fp32, bytes read + written per second, TB/s."""
    a = torch.randn(2**28, device=dev)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e9


def ceilings(dev: str = "cuda") -> dict:
    out = {"copy_TBps": copy_tbps(dev)}
    s = 8192
    x = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    y = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=20, rep=100, return_mode="median")
    out["bf16_TFLOPs"] = 2 * s**3 / ms / 1e9
    xi = torch.randint(-128, 128, (s, s), dtype=torch.int8, device=dev)
    yi = torch.randint(-128, 128, (s, s), dtype=torch.int8, device=dev)
    ms = do_bench(lambda: torch._int_mm(xi, yi.t()), warmup=20, rep=100, return_mode="median")
    out["int8_int_mm_TOPs"] = 2 * s**3 / ms / 1e9
    x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
    sa, sb = randf(s, 1) + 0.5, randf(1, s) + 0.5
    ms = do_bench(lambda: torch._scaled_mm(x8, y8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                  warmup=20, rep=100, return_mode="median")
    out["fp8_scaled_mm_TFLOPs"] = 2 * s**3 / ms / 1e9
    return out
