"""The `pq_ao::` ops: eager == reference, fake/schema/autograd registration (opcheck), compile, export, dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from pq_ao import hadamard, quant_math
from pq_ao.kernels import ops
from pq_ao.kernels import reference as ref

OPS = torch.ops.pq_ao


def _inputs(seed: int = 0, m: int = 7, k: int = 48, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    had_k = hadamard.hadamard_factor(k)[1].float()
    xs = torch.tensor([0.07])
    w = torch.randn(n, k, generator=gen)
    ws = quant_math.per_channel_scale(w, 4)
    wq = quant_math.pack_int4(quant_math.quantize(w, ws[:, None], 4))
    bias = torch.randn(n, generator=gen)
    return x, had_k, xs, wq, ws, bias


def test_eager_ops_are_the_reference():
    x, had_k, xs, wq, ws, bias = _inputs()
    assert torch.equal(OPS.hadamard_transform(x, had_k), ref.hadamard_transform(x, had_k))
    for bits in (4, 8):
        assert torch.equal(OPS.quantize_static(x, xs, bits), ref.quantize_static(x, xs, bits))
        assert torch.equal(
            OPS.hadamard_quantize_static(x, had_k, xs, bits), ref.hadamard_quantize_static(x, had_k, xs, bits)
        )
        for a, b in zip(OPS.quantize_dynamic(x, bits), ref.quantize_dynamic(x, bits)):
            assert torch.equal(a, b)
    xq = OPS.quantize_static(x, xs, 4)
    got = OPS.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.bfloat16)
    assert torch.equal(got, ref.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.bfloat16))


def test_opcheck():
    x, had_k, xs, wq, ws, bias = _inputs(1)
    xq = ref.quantize_static(x, xs, 4)
    cases = [
        (OPS.hadamard_transform, (x.requires_grad_(), had_k)),
        (OPS.quantize_static, (x, xs, 4)),
        (OPS.hadamard_quantize_static, (x, had_k, xs, 8)),
        (OPS.quantize_dynamic, (x, 4)),
        (OPS.int_linear, (xq, xs, wq, ws, bias.requires_grad_(), 4, 4, torch.float32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_autograd():
    x, had_k, xs, wq, ws, bias = _inputs(2)
    x.requires_grad_()
    g = torch.randn(x.shape)
    (OPS.hadamard_transform(x, had_k) * g).sum().backward()
    n = x.shape[-1]
    dense = torch.kron(had_k.double(), hadamard.sylvester(n // had_k.shape[0])) / math.sqrt(n)
    torch.testing.assert_close(x.grad.double(), g.double() @ dense, rtol=0, atol=1e-5)
    bias = bias.bfloat16().requires_grad_()
    xq = OPS.quantize_static(x, xs, 4)
    gy = torch.randn(x.shape[0], wq.shape[0])
    (OPS.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.float32) * gy).sum().backward()
    assert bias.grad.dtype == torch.bfloat16
    assert torch.equal(bias.grad, gy.sum(0).bfloat16())


def _pipeline(x, had_k, xs, wq, ws, bias):
    y1 = OPS.int_linear(OPS.hadamard_quantize_static(x, had_k, xs, 4), xs, wq, ws, bias, 4, 4, x.dtype)
    q, s = OPS.quantize_dynamic(OPS.hadamard_transform(x, had_k), 4)
    y2 = OPS.int_linear(q, s, wq, ws, None, 4, 4, x.dtype)
    y3 = OPS.int_linear(OPS.quantize_static(x, xs, 4), xs, wq, ws, bias, 4, 4, x.dtype)
    return y1 + y2 + y3


def test_compile_fullgraph_matches_eager():
    """Dynamo + AOTAutograd (the triton_op decomposition, fake kernels); inductor itself is exercised by the
    subclass tests (tests/tensors), which compile and AOTI-package modules built on these ops."""
    args = _inputs(3, m=9)
    torch.compiler.reset()
    got = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got, _pipeline(*args))


class _Pipeline(torch.nn.Module):
    def forward(self, x, had_k, xs, wq, ws, bias):
        return _pipeline(x, had_k, xs, wq, ws, bias)


def test_export_keeps_the_ops():
    args = _inputs(4)
    ep = torch.export.export(_Pipeline(), args, strict=True)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("hadamard_transform", "quantize_static", "hadamard_quantize_static", "quantize_dynamic", "int_linear"):
        assert f"pq_ao.{name}.default" in targets, targets
    assert torch.equal(ep.module()(*args), _pipeline(*args))


def test_cuda_branch_dispatch(monkeypatch):
    """The op body calls the Triton launcher for CUDA tensors and falls back to the reference without one."""
    x, had_k, xs, wq, ws, bias = _inputs(5)
    xq = ref.quantize_static(x, xs, 4)
    calls = []

    def fake_launcher(*args):
        calls.append(len(args))
        return ref.int_linear(*args) + 1

    monkeypatch.setattr(ops, "_on_cuda", lambda t: True)
    monkeypatch.setattr(ops, "_triton_int_linear", fake_launcher)
    want = ref.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.float32)
    assert torch.equal(OPS.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.float32), want + 1) and calls == [8]
    monkeypatch.setattr(ops, "_triton_int_linear", None)
    assert torch.equal(OPS.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.float32), want)


def test_op_errors_surface():
    x, had_k, xs, *_ = _inputs(6)
    with pytest.raises(ValueError, match="0-d"):
        OPS.quantize_static(x, torch.tensor(0.1), 4)
    with pytest.raises(ValueError, match="K \\* 2\\*\\*m"):
        OPS.hadamard_transform(x[:, :40], had_k)


def test_static_linears_are_the_reference_composition():
    """`static_linear` = int_linear(hadamard_quantize_static(x)) and `swiglu_static_linear` the same of
    `reference.swiglu(gate_up)`, bitwise on the CPU; registered for fake tensors, autograd (the bias) and compile."""
    x, had_k, xs, wq, ws, bias = _inputs(7)
    gen = torch.Generator().manual_seed(7)
    gate_up = torch.randn(x.shape[0], 2 * x.shape[1], generator=gen)
    for hk in (had_k, None):
        for inp, op, act in ((x, OPS.static_linear, x), (gate_up, OPS.swiglu_static_linear, ref.swiglu(gate_up))):
            xq = ref.hadamard_quantize_static(act, hk, xs, 4) if hk is not None else ref.quantize_static(act, xs, 4)
            want = ref.int_linear(xq, xs, wq, ws, bias, 4, 4, torch.float32)
            assert torch.equal(op(inp, xs, hk, wq, ws, bias, 4, 4, torch.float32), want)
    b = bias.clone().requires_grad_()
    torch.library.opcheck(OPS.swiglu_static_linear, (gate_up, xs, had_k, wq, ws, b, 4, 4, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip
    gy = torch.randn(x.shape[0], wq.shape[0], generator=gen)
    (OPS.swiglu_static_linear(gate_up, xs, had_k, wq, ws, b, 4, 4, torch.float32) * gy).sum().backward()
    assert torch.equal(b.grad, gy.sum(0))
    torch.compiler.reset()
    fn = torch.compile(lambda g: OPS.swiglu_static_linear(g, xs, had_k, wq, ws, bias, 4, 4, torch.float32),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    assert torch.equal(fn(gate_up), OPS.swiglu_static_linear(gate_up, xs, had_k, wq, ws, bias, 4, 4, torch.float32))
    with pytest.raises(ValueError, match="even last dim"):
        OPS.swiglu_static_linear(gate_up[:, 1:], xs, None, wq, ws, bias, 4, 4, torch.float32)
