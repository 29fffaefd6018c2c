"""IntxLinearWeight: construction, F.linear against an fp64 fake-quant reference, SQNR, torchao plumbing,
compile / export / AOTInductor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pq_ao import hadamard
from pq_ao import quant_math as qm
from pq_ao.kernels import reference as ref
from pq_ao.tensors import IntxLinearWeight

ACTS = [(4, "static"), (8, "static"), (4, "dynamic"), (8, "dynamic"), (16, "none")]
SHAPES = [((1,), 40, 24), ((3, 5), 130, 17), ((7,), 96, 33)]  # K = 20*2 (Paley), 65*2 (QR fallback), 12*8


def _weight(w, w_bits, a_bits, mode, had, calib=None, **kw):
    k = w.shape[1]
    had_k = hadamard.hadamard_factor(k)[1] if had else None
    act_scale = None
    if mode == "static":
        c = calib if calib is not None else torch.randn(64, k)
        c = ref.hadamard_transform(c, had_k.float()) if had else c
        act_scale = qm.scale_from_absmax(c.abs().amax(), a_bits)
    return IntxLinearWeight.from_float(w, w_bits, a_bits, mode, act_scale=act_scale, had_k=had_k, **kw)


def _fake_quant_linear(x, w, qw: IntxLinearWeight, bias):
    """The quantized linear as fp64 math on fake-quantized operands (independent of the integer path)."""
    w_hat = qm.fake_quantize(w.float(), qm.per_channel_scale(w, qw.w_bits)[:, None], qw.w_bits).double()
    had_k = qw.had_k
    if qw.act_mode == "static":  # the fused kernel quantizes the fp32 transform
        xr = ref.hadamard_transform(x.float(), had_k) if had_k is not None else x.float()
        x_hat = qm.fake_quantize(xr, qw.act_scale, qw.a_bits)
    else:  # the transform is its own op, rounded to x.dtype
        xr = ref.hadamard_transform(x, had_k) if had_k is not None else x
        x_hat = qm.fake_quantize(xr, qm.per_token_scale(xr, qw.a_bits), qw.a_bits) if qw.act_mode == "dynamic" else xr
    y = x_hat.double() @ w_hat.T
    return y if bias is None else y + bias.double()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("a_bits,mode", ACTS)
@pytest.mark.parametrize("had", [False, True])
def test_linear_matches_fake_quant_reference(w_bits, a_bits, mode, had):
    gen = torch.Generator().manual_seed(w_bits * 100 + a_bits * 10 + had)
    for i, (lead, k, n) in enumerate(SHAPES):
        w = torch.randn(n, k, generator=gen) / k**0.5
        qw = _weight(w, w_bits, a_bits, mode, had)
        bias = torch.randn(n, generator=gen) if i % 2 else None
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)]:
            x = torch.randn(*lead, k, generator=gen).to(dtype)
            y = F.linear(x, qw.to(dtype), None if bias is None else bias.to(dtype))
            assert y.dtype == dtype and y.shape == (*lead, n)
            want = _fake_quant_linear(x, w, qw, None if bias is None else bias.to(dtype))
            assert _rel(y, want) < tol, (lead, k, n, dtype, _rel(y, want))


@pytest.mark.parametrize(
    "w_bits,a_bits,mode,min_db",
    [(8, 8, "static", 36.5), (8, 8, "dynamic", 38.5), (4, 4, "static", 12.0), (4, 4, "dynamic", 14.0),
     (4, 8, "static", 17.0), (4, 16, "none", 17.0), (8, 16, "none", 41.5)],
)
def test_sqnr_on_gaussian_data(w_bits, a_bits, mode, min_db):
    """Measured (3 seeds): W8A8 static 37.6-38.1 dB, dynamic 39.4-39.5; W4A4 13.0-13.5 / 14.8-14.9; W4A8 17.8-17.9;
    W4A16 17.8-18.0; W8A16 42.4-42.6. A wrong scale, nibble order or grid costs far more than the margins."""
    gen = torch.Generator().manual_seed(w_bits + a_bits)
    x, calib = torch.randn(256, 576, generator=gen), torch.randn(256, 576, generator=gen)
    w = torch.randn(384, 576, generator=gen) / 24
    y = F.linear(x, _weight(w, w_bits, a_bits, mode, False, calib=calib))
    r = F.linear(x, w)
    sqnr = 10 * torch.log10(r.pow(2).sum() / (r - y).pow(2).sum()).item()
    assert sqnr > min_db, sqnr


def test_from_float_fields_and_dequantize():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=gen)
    clip = torch.linspace(0.6, 1.0, 12)
    for w_bits in (4, 8):
        qw = IntxLinearWeight.from_float(w, w_bits, 8, "static", act_scale=0.25, clip=clip)
        assert qw.shape == (12, 20) and qw.dtype == torch.float32 and not qw.requires_grad
        assert qw.qdata.shape == ((12, 10) if w_bits == 4 else (12, 20))
        assert qw.qdata.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
        s = qm.per_channel_scale(w, w_bits, clip)
        assert torch.equal(qw.scale, s)
        assert torch.equal(qw.dequantize(), qm.fake_quantize(w, s[:, None], w_bits))
        assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert qw.act_scale.shape == (1,) and qw.act_scale.dtype == torch.float32 and qw.act_scale.item() == 0.25
    given = torch.rand(12) * 0.1 + 0.01
    qw = IntxLinearWeight.from_float(w.bfloat16(), 4, 16, "none", w_scale=given)
    assert torch.equal(qw.scale, given) and qw.dtype == torch.bfloat16


def test_construction_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="act_scale is required"):
        IntxLinearWeight.from_float(w, 4, 4, "static")
    with pytest.raises(ValueError, match="act_scale is required"):
        IntxLinearWeight.from_float(w, 4, 4, "dynamic", act_scale=0.1)
    with pytest.raises(ValueError, match="a_bits=16"):
        IntxLinearWeight.from_float(w, 4, 16, "static", act_scale=0.1)
    with pytest.raises(ValueError, match="a_bits=16"):
        IntxLinearWeight.from_float(w, 4, 4, "none")
    with pytest.raises(ValueError, match="act_mode"):
        IntxLinearWeight.from_float(w, 4, 4, "per_token")
    with pytest.raises(ValueError, match="bits"):
        IntxLinearWeight.from_float(w, 3, 16, "none")
    with pytest.raises(ValueError, match="even K"):
        IntxLinearWeight.from_float(torch.randn(8, 15), 4, 16, "none")
    with pytest.raises(ValueError, match="had_k"):
        IntxLinearWeight.from_float(w, 4, 16, "none", had_k=torch.ones(3, 3))
    with pytest.raises(ValueError, match="either w_scale or clip"):
        IntxLinearWeight.from_float(w, 4, 16, "none", w_scale=torch.ones(8), clip=0.9)
    with pytest.raises(ValueError, match="one value"):
        IntxLinearWeight.from_float(w, 4, 4, "static", act_scale=torch.ones(2))
    qw = IntxLinearWeight.from_float(w, 8, 8, "dynamic")
    with pytest.raises(ValueError, match="features"):
        F.linear(torch.randn(2, 15), qw)
    with pytest.raises(NotImplementedError, match="does not implement aten.add.Tensor.*dequantize"):
        qw + 1


def test_odd_k_w8a8():
    w, x = torch.randn(5, 45), torch.randn(3, 45)
    qw = _weight(w, 8, 8, "static", True)  # 45 = K_h: the QR-fallback factor, m = 0
    assert _rel(F.linear(x, qw), _fake_quant_linear(x, w, qw, None)) < 1e-5


def test_module_plumbing_and_serialization(tmp_path):
    from torchao.core.config import ALLOWED_AO_MODULES
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
        unflatten_tensor_state_dict,
    )
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_CLASSES, ALLOWED_TENSORS_SUBCLASSES

    assert "pq_ao" in ALLOWED_AO_MODULES and "IntxLinearWeight" in ALLOWED_TENSORS_SUBCLASSES
    assert ALLOWED_CLASSES["IntxLinearWeight"] is IntxLinearWeight
    lin = torch.nn.Linear(48, 10)
    lin.weight = torch.nn.Parameter(_weight(lin.weight.detach(), 4, 4, "static", True), requires_grad=False)
    x = torch.randn(3, 48)
    y = lin(x)

    path = tmp_path / "sd.pt"
    torch.save(lin.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert type(sd["weight"]) is IntxLinearWeight and sd["weight"].had_k is not None
    other = torch.nn.Linear(48, 10)
    other.weight = torch.nn.Parameter(_weight(torch.randn(10, 48), 4, 4, "static", True), requires_grad=False)
    other.load_state_dict(sd)  # copy_ into a subclass of the same metadata
    assert torch.equal(other(x), y)

    tensors, metadata = flatten_tensor_state_dict(torch.nn.Sequential(lin).state_dict())  # keys need a module
    assert "0._weight_act_scale" in tensors and "0._weight_had_k" in tensors
    back, leftover = unflatten_tensor_state_dict(tensors, metadata)
    assert not leftover
    seq = torch.nn.Sequential(torch.nn.Linear(48, 10, device="meta"))
    seq.load_state_dict(back, assign=True)
    assert type(seq[0].weight) is IntxLinearWeight and torch.equal(seq(x), y)

    clone = lin.weight.detach().clone()
    assert type(clone) is IntxLinearWeight and torch.equal(clone.qdata, lin.weight.qdata)
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.qdata.dtype == torch.uint8
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    assert lin.weight.to("cpu") is lin.weight
    h1 = lin.weight._stable_hash_for_caching()
    assert h1 == lin.weight.detach()._stable_hash_for_caching()
    assert h1 != IntxLinearWeight.from_float(torch.randn(10, 48), 4, 4, "dynamic")._stable_hash_for_caching()


class _Linears(torch.nn.Sequential):
    """Linears with IntxLinearWeight weights, (in, out, bias, (w_bits, a_bits, act_mode, had)) each, ReLU between."""

    def __init__(self, *layers):
        gen = torch.Generator().manual_seed(0)
        mods = []
        for k, n, bias, cfg in layers:
            lin = torch.nn.Linear(k, n, bias=bias)
            w = torch.randn(n, k, generator=gen) / k**0.5
            calib = torch.randn(64, k, generator=gen) * 2
            lin.weight = torch.nn.Parameter(_weight(w, *cfg, calib=calib), requires_grad=False)
            mods += [lin, torch.nn.ReLU()]
        super().__init__(*mods[:-1])


# Between them, every op: static + Hadamard (fused), dynamic + Hadamard, static plain.
ALL_OPS = [(96, 64, True, (4, 4, "static", True)), (64, 40, False, (8, 8, "dynamic", True)),
           (40, 24, True, (4, 8, "static", False))]


def test_compile_fullgraph_matches_eager():
    m, x = _Linears(ALL_OPS[2]), torch.randn(2, 9, 40)  # one layer: inductor builds are slow on CPU
    torch.compiler.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=1e-6, atol=1e-6)


def test_compile_with_grad_mode_on():
    """Biases are trainable Parameters (as in an HF model), so compile traces the ops' autograd formulas. Only the
    last bias gets a gradient: the quantizers pass none (rounding has zero derivative)."""
    m, x = _Linears(*ALL_OPS), torch.randn(2, 9, 96)
    torch.compiler.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(3, 5, 96)
    assert torch.equal(compiled(x0), m(x0))
    got = compiled(x)  # a second shape: M becomes symbolic
    assert torch.equal(got, m(x))
    got.sum().backward()
    assert torch.equal(m[4].bias.grad, torch.ones(18, 24).sum(0)) and m[0].bias.grad is None


@pytest.mark.slow
def test_export_and_aoti_package_loads_without_pq_ao(tmp_path):
    m, x = _Linears(*ALL_OPS[:2]), torch.randn(2, 9, 96)
    with torch.no_grad():
        want = m(x)
        ep = torch.export.export(m, (x,), strict=True)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert {"pq_ao.static_linear.default", "pq_ao.quantize_dynamic.default",
                "pq_ao.int_linear.default"} <= targets
        assert torch.equal(ep.module()(x), want)
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    torch.save((x, want), tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        x, want = torch.load({str(tmp_path / 'io.pt')!r})
        got = torch._inductor.aoti_load_package({package!r})(x)
        assert not any(k.split('.')[0] == 'pq_ao' for k in sys.modules), 'pq_ao got imported'
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), err
        print('ok', err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels compiled by inductor)")
@pytest.mark.parametrize("online_hadamard", [True, False])
def test_compiled_static_linear_matches_eager_on_cuda(online_hadamard):
    """Inductor once passed the Hadamard kernel's Python-float `inv_sqrt_n` as fp64 and the fused kernel failed to
    compile (H200, 2026-12-01): a static W4A4 linear, with and without the online Hadamard, compiled == eager."""
    from pq_ao.hadamard import hadamard_factor

    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(1536, 576, generator=gen).cuda(), torch.randn(4, 33, 576, generator=gen).cuda()
    lin = torch.nn.Linear(576, 1536, bias=False, device="cuda")
    had = hadamard_factor(576)[1] if online_hadamard else None
    lin.weight = torch.nn.Parameter(IntxLinearWeight.from_float(w, 4, 4, "static", act_scale=0.05, had_k=had),
                                    requires_grad=False)
    torch.compiler.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(lin, fullgraph=True)(x), lin(x))


def test_act_range_is_the_static_scale_or_the_dynamic_clip():
    w = torch.randn(8, 32)
    static = IntxLinearWeight.from_float(w, 4, 4, "static", act_scale=0.2)
    dynamic = IntxLinearWeight.from_float(w, 4, 4, "dynamic", act_clip=0.9)
    assert static.act_range is static.act_scale and dynamic.act_range is dynamic.act_clip
    static.set_act_range(static.act_range * 0.5)
    dynamic.set_act_range(0.7)
    assert static.act_scale.item() == pytest.approx(0.1) and dynamic.act_clip.item() == pytest.approx(0.7)
    weight_only = IntxLinearWeight.from_float(w, 4, 16, "none")
    assert weight_only.act_range is None
    with pytest.raises(ValueError, match="no activation range"):
        weight_only.set_act_range(1.0)
