"""Compiling with eager's rounding: `eager_numerics()`, for an AOTI package whose greedy text is eager's.

A static W4A4 model is a chaotic function of rounding: a few ulps move a value across a 4-bit rounding boundary,
its code changes by a whole grid step, and the layers after it carry the change on. A relative 1e-6 on the layer
outputs of SmolLM2-135M changes its greedy text by the third token (`benchmarks/text_sensitivity.py`). A compiled
program is then "the same model" only if its arithmetic is bitwise eager's. Inductor's is not, by design: it
contracts `a * b + c` into FMAs, lowers `/` to an approximate division, uses Triton's libdevice, and sums
reductions in its own order.

Inside `eager_numerics()`, inductor (1) turns on torch's own eager-parity switches, those this torch has:
`emulate_precision_casts` (no FMA contraction, eager's casts), division rounding, the CUDA toolkit's libdevice;
and (2) calls ATen's kernels, the ones eager runs, for the ops that can still round otherwise (`FALLBACK_OPS`:
the RMSNorm mean, rsqrt, silu, exp, RoPE's cos / sin, division), as extern calls that a package makes without
Python (through AOTI's proxy executor). What is left to generated code (adds, multiplies, casts, comparisons,
gathers, bit operations) rounds as eager does. pq_ao's own kernels are the same in eager and compiled code.

Invariant: on exit inductor's lowering and decomposition tables are as they were; caches are off inside (the
patched tables are not part of inductor's cache keys, so a cached graph of the other kind could be reused).
Cost: a few more launches per layer (the fallbacks are not fused). `pq_ao.export` compiles this way by default
(`DEFAULT`); `numerics="inductor"` is inductor's own arithmetic, as correct, with other rounding and so, for a
static W4A4 model, another greedy text.
"""

from __future__ import annotations

import contextlib

import torch

NUMERICS = ("eager", "inductor")
DEFAULT = "eager"  # a package is the model that was evaluated: its greedy text is eager's
FALLBACK_OPS = ("mean.dim", "sum.dim_IntList", "rsqrt.default", "silu.default", "sigmoid.default", "exp.default",
                "cos.default", "sin.default", "div.Tensor", "reciprocal.default")  # fmt: skip


def inductor_options() -> dict:
    """Inductor's eager-parity settings that this torch has (their names moved between releases)."""
    cfg = torch._inductor.config
    opts = {"emulate_precision_casts": True} if hasattr(cfg, "emulate_precision_casts") else {}
    if hasattr(cfg, "emulate_divison_rounding"):  # sic, before torch moved it into eager_numerics
        opts["emulate_divison_rounding"] = True
    numerics = getattr(cfg, "eager_numerics", None)
    for key in ("division_rounding", "use_pytorch_libdevice"):
        if numerics is not None and hasattr(numerics, key):
            opts[f"eager_numerics.{key}"] = True
    return opts


def _ops(names=FALLBACK_OPS) -> list:
    out = []
    for name in names:
        packet, overload = name.split(".")
        out.append(getattr(getattr(torch.ops.aten, packet), overload))
    return out


@contextlib.contextmanager
def eager_numerics(names=FALLBACK_OPS):
    """Inductor compiles, inside, with eager's rounding (the module docstring says how); yields its settings."""
    from torch._inductor import decomposition, lowering

    ops = _ops(names)
    fast = getattr(decomposition, "fast_random_decomps", None)  # the table select_decomp_table() returns
    tables = [decomposition.decompositions] + ([fast()] if fast is not None else [])
    saved_decomps = [{op: t[op] for op in ops if op in t} for t in tables]
    saved_lowerings = {op: lowering.lowerings[op] for op in ops if op in lowering.lowerings}
    sets = (lowering.fallbacks, lowering.needs_realized_inputs)
    saved_sets = [list(x) for x in sets]
    options = {**inductor_options(), "force_disable_caches": True}
    try:
        for op in ops:
            for t in tables:
                t.pop(op, None)
            lowering.make_fallback(op, warn=False, override_decomp=True)
        with torch._inductor.config.patch(options):
            yield options
    finally:
        for op in ops:
            lowering.lowerings.pop(op, None)
        lowering.lowerings.update(saved_lowerings)
        for t, saved in zip(tables, saved_decomps):
            t.update(saved)
        for current, saved in zip(sets, saved_sets):
            current.clear()
            current.update(saved)


def compiling(numerics: str):
    """The context `pq_ao.export` compiles in: `eager_numerics()` for "eager", nothing for "inductor"."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return eager_numerics() if numerics == "eager" else contextlib.nullcontext()
