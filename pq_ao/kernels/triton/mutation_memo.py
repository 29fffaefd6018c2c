"""Compile time: inductor's mutation analysis of our kernels, worked out once per distinct launch.

For every call site of a user-defined Triton kernel, torch (2.11-2.13) compiles the kernel to TTIR and walks it to
learn which arguments it writes. It asks again at later stages of the same compile (functionalization, lowering,
the IR node; pytorch/pytorch#193227 removes the repeats upstream); AOTAutograd alone asks 3 times per launch. A
static W4A4 layer launches ~17 of our kernels, so a 32-layer graph pays for thousands of TTIR compiles: ~200 s of
a `torch.compile`, against ~30 s for the bf16 model (H200, torch 2.11), and more for an AOTI export of prefill and
decode.

`enable()` wraps torch's analysis function with a memo for the kernels of this package only, from the moment our
kernels can be compiled: a pq_ao model is built (`quantize_`) or loaded (`load_quantized`), or exported
(`pq_ao.export`); `import pq_ao` alone patches nothing. `PQ_AO_MUTATION_MEMO=0` leaves torch's function alone. It
can go once torch asks once per call site (pytorch/pytorch#193227): set `FIXED_IN` to that release and
`enable()` stops installing it there. Invariant: the
answer is a function of the kernel, its constexprs, its tensor dtypes and its scalar values, which is the key. The
kernel is keyed by module, name and source, since inductor hands over a fresh copy of it per launch.
Alignment (the one specialization left out of the key) changes how a store is vectorised, never which pointer it
writes. Kernels of other packages go straight to torch's function. If torch renames the function, nothing is
wrapped and compiles are just slower (`tests/kernels/triton/test_mutation_memo.py` notices).
"""

from __future__ import annotations

import functools
import os

import torch

# The function's name across torch versions: 2.13 returns TensorAccesses, earlier versions a list of names.
ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
MAX_ENTRIES = 4096
ENV = "PQ_AO_MUTATION_MEMO"  # "0": never install
FIXED_IN: tuple[int, int] | None = None  # the first torch (major, minor) that analyses once per call site; unknown yet


class _Uncacheable(Exception):
    pass


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    get_dtype = getattr(value, "get_dtype", None)  # inductor IR (TensorBox and friends)
    if callable(get_dtype):
        return ("ir", get_dtype())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) or type(value).__module__.startswith("sympy"):
        return ("sym", str(value))
    raise _Uncacheable(type(value))


def _jit_function(kernel):
    """The JITFunction under a kernel. Inductor hands the analysis a fresh Autotuner around a fresh copy of it per
    launch (its one config carries the launch's constexprs, which reach the analysis in `kwargs` too)."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _identity(kernel) -> tuple:
    """What names a kernel across those copies: its function's module, qualified name and source."""
    jit = _jit_function(kernel)
    fn = jit.fn
    return (fn.__module__, fn.__qualname__, getattr(jit, "src", None))


def ours(kernel) -> bool:
    """Whether a Triton kernel (JITFunction, or an Autotuner around one) is defined in pq_ao."""
    fn = getattr(_jit_function(kernel), "fn", None)
    return getattr(fn, "__module__", "").startswith("pq_ao.")


def memoized(analysis):
    """`analysis(kernel, kwargs, *rest)` with a memo for pq_ao kernels (keys as the module docstring says)."""
    if getattr(analysis, "_pq_ao_memo", None) is not None:
        return analysis
    memo: dict = {}
    counts = dict.fromkeys(("hits", "misses", "unkeyed", "foreign"), 0)

    @functools.wraps(analysis)
    def wrapper(kernel, kwargs, *rest, **kw):
        if not ours(kernel):
            counts["foreign"] += 1
            return analysis(kernel, kwargs, *rest, **kw)
        try:
            key = (_identity(kernel), tuple(sorted((k, _arg_key(v)) for k, v in kwargs.items())), repr(rest), repr(kw))
            hash(key)
        except Exception:  # noqa: BLE001 - an argument we can't key on (or an IR node without a dtype): no memo
            counts["unkeyed"] += 1
            return analysis(kernel, kwargs, *rest, **kw)
        if key in memo:
            counts["hits"] += 1
        else:
            counts["misses"] += 1
            if len(memo) >= MAX_ENTRIES:
                memo.clear()
            memo[key] = analysis(kernel, kwargs, *rest, **kw)
        return memo[key]

    wrapper._pq_ao_memo = memo
    wrapper._pq_ao_counts = counts
    return wrapper


def _analyses() -> tuple:
    """(torch's triton_kernel_wrap module or None, {name: the analysis function there now})."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as twrap
    except ImportError:
        return None, {}
    return twrap, {n: getattr(twrap, n) for n in ANALYSES if callable(getattr(twrap, n, None))}


def counts() -> dict:
    """Calls of the installed memos so far, summed: hits, misses (torch's analysis ran), unkeyed (an argument the
    key can't hold: torch's analysis ran) and foreign (another package's kernel)."""
    total: dict = {}
    for fn in _analyses()[1].values():
        for k, v in getattr(fn, "_pq_ao_counts", {}).items():
            total[k] = total.get(k, 0) + v
    return total


def needed() -> bool:
    """Whether to install the memo here: not switched off (`PQ_AO_MUTATION_MEMO=0`), and a torch that repeats the
    analysis (every release up to 2.13 does; `FIXED_IN` marks the first that does not)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return FIXED_IN is None or version < FIXED_IN


def enable() -> list[str]:
    """`install()` where `needed()`; the names wrapped (none otherwise). Called where our kernels start being
    compiled: `quantize_`, `load_quantized`, `pq_ao.export`."""
    return install() if needed() else []


def install() -> list[str]:
    """Wrap torch's mutation analysis (idempotent); returns the names wrapped."""
    twrap, fns = _analyses()
    for name, fn in fns.items():
        setattr(twrap, name, memoized(fn))
    return list(fns)


def uninstall() -> list[str]:
    """Put torch's own analysis back (the inverse of `install`); returns the names unwrapped."""
    twrap, fns = _analyses()
    memos = [name for name, fn in fns.items() if getattr(fn, "_pq_ao_memo", None) is not None]
    for name in memos:
        setattr(twrap, name, fns[name].__wrapped__)
    return memos
