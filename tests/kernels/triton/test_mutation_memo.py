"""The memo over inductor's mutation analysis (`pq_ao.kernels.triton.mutation_memo`).

The analysis is torch's own, run on the CPU: Triton builds TTIR for a named target without a GPU, so a stand-in
driver that reports sm_90 is all it needs. Checked: the memo is installed on the function torch calls, it gives
torch's answer for every launch of every kernel, it runs the analysis once per distinct launch, and other
packages' kernels bypass it.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from pq_triton_launches import LAUNCH_OPTIONS, every_launch, record_launches
from pq_triton_offline import sm90_driver

from pq_ao.kernels.triton import gemm, mutation_memo
from pq_ao.kernels.triton._common import interpreting

twrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
compiled_kernels = pytest.mark.skipif(interpreting(), reason="kernels decorated for the interpreter")


@pytest.fixture
def sm90():
    with sm90_driver():
        yield


def _installed() -> list:
    return [n for n in mutation_memo.ANALYSES if getattr(getattr(twrap, n, None), "_pq_ao_memo", None) is not None]


def _writes(result) -> set:
    """Names written, from either form of the answer (TensorAccesses in torch 2.13, a list of names before)."""
    if isinstance(result, (list, tuple)):
        return set(result)
    return {dep.name for dep in result.read_writes.writes}


def test_import_patches_nothing_until_enabled():
    """`import pq_ao` leaves torch alone (a fresh process); `enable()` installs the memo on the function torch
    calls, and `PQ_AO_MUTATION_MEMO=0` keeps it off."""
    import subprocess
    import sys

    code = ("import pq_ao; from torch._higher_order_ops import triton_kernel_wrap as t; "
            "from pq_ao.kernels.triton import mutation_memo as m; "
            "print(sorted(n for n in m.ANALYSES if getattr(getattr(t, n, None), '_pq_ao_memo', None) is not None), "
            "m.enable())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().split("] ")
    assert before == "[" and after != "[]", out.stdout
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, mutation_memo.ENV: "0"})  # fmt: skip
    assert off.stdout.strip() == "[] []", off.stdout + off.stderr


def test_installed_where_torch_calls_it():
    mutation_memo.install()
    assert _installed(), f"none of {mutation_memo.ANALYSES} in torch's triton_kernel_wrap: torch renamed it"
    assert mutation_memo.install() == _installed()  # idempotent: no second layer


def test_enable_follows_the_switch_and_the_version_gate(monkeypatch):
    monkeypatch.delenv(mutation_memo.ENV, raising=False)
    assert mutation_memo.needed()
    monkeypatch.setattr(mutation_memo, "FIXED_IN", (2, 0))  # a torch that analyses once: nothing to do
    assert not mutation_memo.needed() and mutation_memo.enable() == []
    monkeypatch.setattr(mutation_memo, "FIXED_IN", None)
    monkeypatch.setenv(mutation_memo.ENV, "0")
    assert not mutation_memo.needed()


def test_uninstall_restores_torchs_function():
    mutation_memo.install()
    names = _installed()
    wrapped = {n: getattr(twrap, n) for n in names}
    try:
        assert mutation_memo.uninstall() == names
        assert _installed() == []
        assert all(getattr(twrap, n) is wrapped[n].__wrapped__ for n in names)
        assert mutation_memo.uninstall() == []  # nothing left to unwrap
    finally:
        mutation_memo.install()
    assert _installed() == names


class _Counted:
    """torch's own analysis (under the installed memo), counting its runs."""

    def __init__(self):
        self.name = _installed()[0]
        self.torchs = getattr(twrap, self.name).__wrapped__
        self.calls = []

    def __call__(self, kernel, kwargs, *rest):
        self.calls.append(kernel)
        return self.torchs(kernel, kwargs, *rest)


@compiled_kernels
def test_memo_gives_torchs_answer_once_per_distinct_launch(sm90, monkeypatch):
    counted = _Counted()
    torchs, calls = counted.torchs, counted.calls
    memo = mutation_memo.memoized(counted)
    launches = record_launches(monkeypatch)
    every_launch()
    every_launch()  # the same launches again (a second layer of the same model): all hits
    distinct = set()
    for launch in launches:
        kwargs = {k: v for k, v in launch.values.items() if k not in LAUNCH_OPTIONS}
        got = _writes(memo(launch.kernel, kwargs, {}))
        fresh = _writes(torchs(launch.kernel, kwargs, {}))
        assert got == fresh, launch.name
        tensors = {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        assert got and got < tensors, f"{launch.name}: writes {got} (every tensor means the analysis failed)"
        distinct.add((launch.kernel, tuple(sorted((k, mutation_memo._arg_key(v)) for k, v in kwargs.items()))))
    assert len(calls) == len(distinct) <= len(launches) // 2
    assert memo._pq_ao_counts == {"hits": len(launches) - len(calls), "misses": len(calls), "unkeyed": 0,
                                  "foreign": 0}


@triton.jit
def _foreign_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


def test_other_kernels_bypass_the_memo():
    calls = []
    memo = mutation_memo.memoized(lambda kernel, kwargs, *rest: calls.append(kernel) or ["out_ptr"])
    kwargs = {"x_ptr": torch.zeros(4), "out_ptr": torch.zeros(4), "N": 4}
    memo(_foreign_kernel, kwargs, {})
    memo(_foreign_kernel, kwargs, {})
    assert len(calls) == 2
    assert not mutation_memo.ours(_foreign_kernel) and mutation_memo.ours(gemm._int_linear_kernel)


def test_key_separates_what_changes_the_answer():
    key = mutation_memo._arg_key
    assert key(torch.zeros(2, dtype=torch.uint8)) != key(torch.zeros(2, dtype=torch.int8))
    assert key(torch.zeros(2)) == key(torch.zeros(3, 5))  # shapes reach the kernel only as scalar arguments
    assert key(1) != key(2) and key(True) != key(1) and key(None) != key(0)
    with pytest.raises(mutation_memo._Uncacheable):
        key(object())


def test_unkeyable_arguments_go_straight_to_torch():
    calls = []
    memo = mutation_memo.memoized(lambda kernel, kwargs, *rest: calls.append(kernel) or ["out_ptr"])
    kwargs = {"out_ptr": torch.zeros(4), "odd": object()}
    assert memo(gemm._int_linear_kernel, kwargs, {}) == ["out_ptr"]
    memo(gemm._int_linear_kernel, kwargs, {})
    assert len(calls) == 2


@compiled_kernels
def test_memo_hits_across_inductors_kernel_copies_in_a_real_trace(sm90, monkeypatch):
    """AOTAutograd over two identical "layers" of our ops on fake CUDA tensors (no GPU needed): the triton_ops
    decompose into kernel launches, inductor's functionalization asks for each launch's writes (on fresh copies of
    the kernels), and torch's analysis runs once per distinct launch: the first layer's."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pq_ao.hadamard import hadamard_factor

    counted = _Counted()
    monkeypatch.setattr(twrap, counted.name, mutation_memo.memoized(counted))
    calls = counted.calls
    ops = torch.ops.pq_ao
    had = hadamard_factor(576)[1]

    def layers(x, s, w1, w2, ws1, ws2, had):
        for _ in range(2):
            h = ops.int_linear(ops.quantize_static(x, s, 4), s, w1, ws1, None, 4, 4, torch.bfloat16)
            x = ops.int_linear(ops.hadamard_quantize_static(h, had, s, 4), s, w2, ws2, None, 4, 4, torch.bfloat16)
        return x

    graphs = []
    with FakeTensorMode(), torch.no_grad():
        u8 = lambda n, k: torch.empty(n, k // 2, dtype=torch.uint8, device="cuda")  # noqa: E731
        args = (torch.empty(16, 256, dtype=torch.bfloat16, device="cuda"), torch.empty(1, device="cuda"),
                u8(576, 256), u8(256, 576), torch.empty(576, device="cuda"), torch.empty(256, device="cuda"),
                torch.empty(had.shape, dtype=had.dtype, device="cuda"))  # fmt: skip
        aot_function(layers, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
    launches = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 8, graphs[0].graph
    assert 0 < len(calls) <= len(launches) // 2, f"{len(calls)} analyses for {len(launches)} launches"
