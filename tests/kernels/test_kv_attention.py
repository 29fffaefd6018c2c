"""`pq_ao::kv_attention`: the reference against an independent float64 implementation, input validation, the
op (eager, opcheck, compile, export, CUDA dispatch)."""

from __future__ import annotations

import random

import pytest
import torch

from pq_ao import quant_math
from pq_ao.kernels import ops
from pq_ao.kernels import reference as ref

OPS = torch.ops.pq_ao


def make_inputs(b, hq, hkv, tq, s, p, d, bits, dtype=torch.float32, seed=0, density=0.6, q_gain=1.0):
    """Random operands: uniform codes, per-head scales, a bf16 prefix, a random mask with one row (query 0 of
    batch 0) masked everywhere and, for 0 < density < 1 and Tq > 1, a causal pattern in the last batch."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, tq, d, generator=gen) * q_gain).to(dtype)
    qmin, qmax = quant_math.qrange(bits)
    codes = [torch.randint(qmin, qmax + 1, (b, hkv, s, d), generator=gen, dtype=torch.int8) for _ in range(2)]
    if bits == 4:
        codes = [quant_math.pack_int4(c) for c in codes]
    unit = 0.3 if bits == 4 else 0.3 / 16  # k_hat of about unit size
    k_scale = (torch.rand(hkv, generator=gen) + 0.5) * unit
    v_scale = (torch.rand(hkv, generator=gen) + 0.5) * unit
    prefix_k = (torch.randn(1, hkv, p, d, generator=gen) * 2).bfloat16()
    prefix_v = torch.randn(1, hkv, p, d, generator=gen).bfloat16()
    mask = torch.rand(b, tq, s, generator=gen) < density
    mask[0, 0] = False
    if 0 < density < 1 and tq > 1 and s >= tq:
        mask[-1] = torch.ones(tq, s, dtype=torch.bool).tril(s - tq)
    return q, codes[0], codes[1], k_scale, v_scale, prefix_k, prefix_v, mask, d**-0.5, bits


def naive_attention(q, k_codes, v_codes, k_scale, v_scale, prefix_k, prefix_v, mask, scaling, bits):
    """float64, one (batch, query head, query) at a time: dequantize, concatenate the prefix, softmax over the
    visible keys (none visible: 0)."""
    b, hq, tq, d = q.shape
    hkv = k_codes.shape[1]
    unpack = quant_math.unpack_int4 if bits == 4 else (lambda c: c)
    k = unpack(k_codes).double() * k_scale.double()[None, :, None, None]
    v = unpack(v_codes).double() * v_scale.double()[None, :, None, None]
    n_prefix = prefix_k.shape[2]
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            keys = torch.cat((prefix_k[0, kv].double(), k[bi, kv]))
            vals = torch.cat((prefix_v[0, kv].double(), v[bi, kv]))
            for t in range(tq):
                seen = torch.cat((torch.ones(n_prefix, dtype=torch.bool), mask[bi, t]))
                if seen.any():
                    w = torch.softmax((keys[seen] @ q[bi, h, t].double()) * scaling, dim=0)
                    out[bi, h, t] = w @ vals[seen]
    return out


def check_close(y: torch.Tensor, want64: torch.Tensor, what: str) -> None:
    """fp32: within 2e-5 of each row's norm; bf16/fp16: one rounding of the float64 value (plus fp32 noise).
    Rows with nothing to attend must be exactly 0."""
    assert not torch.isnan(y).any(), f"{what}: NaN"
    y64 = y.double()
    empty = want64.abs().amax(-1) == 0
    assert (y64[empty] == 0).all(), f"{what}: a row that sees nothing is not 0"
    rowmax = want64.abs().amax(-1, keepdim=True)
    if y.dtype == torch.float32:
        err = ((y64 - want64).norm(dim=-1) / want64.norm(dim=-1).clamp_min(1e-30))[~empty]
        assert err.numel() == 0 or float(err.max()) < 2e-5, f"{what}: relative error {float(err.max()):.3g}"
    else:
        bound = torch.finfo(y.dtype).eps * want64.abs() + 1e-5 * rowmax
        bad = (y64 - want64).abs() > bound
        assert not bad.any(), f"{what}: {int(bad.sum())} of {y.numel()} off by more than one rounding"


def _random_case(seed: int):
    rng = random.Random(seed)
    hq, hkv = rng.choice([(4, 4), (6, 2), (9, 3)])
    return dict(b=rng.randint(1, 3), hq=hq, hkv=hkv, tq=rng.randint(1, 5),
                s=rng.choice([1, 2, 7, 64, 65, 300]), p=rng.randint(0, 4), d=rng.choice([32, 64]),
                bits=rng.choice([4, 8]),
                dtype=rng.choice([torch.float32, torch.bfloat16]), density=rng.choice([0.05, 0.5, 0.95]),
                q_gain=rng.choice([0.5, 1.0, 4.0]), seed=seed)


@pytest.mark.parametrize("seed", range(40))
def test_reference_matches_float64(seed):
    case = _random_case(seed)
    args = make_inputs(**case)
    y = ref.kv_attention(*args)
    assert y.dtype == case["dtype"] and y.shape == args[0].shape
    check_close(y, naive_attention(*args), str(case))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edge_cases(bits, dtype):
    """No prefix with every slot masked (zeros); one slot; the prefix alone; every slot visible; fp32 and
    fp64 prefixes."""
    for p, s, density in ((0, 5, 0.0), (0, 1, 1.0), (3, 4, 0.0), (2, 33, 1.0)):
        args = make_inputs(2, 6, 2, 3, s, p, 32, bits, dtype, seed=7 + s, density=density)
        y = ref.kv_attention(*args)
        check_close(y, naive_attention(*args), f"P={p} S={s} density={density}")
        if p == 0 and density == 0.0:
            assert torch.equal(y, torch.zeros_like(y))
    args = list(make_inputs(1, 4, 4, 1, 9, 2, 64, bits, dtype, seed=3))
    args[5], args[6] = args[5].float() * 1.001, args[6].double()  # the prefix in other float dtypes
    check_close(ref.kv_attention(*args), naive_attention(*args), "fp32/fp64 prefix")


def test_nibble_order_and_scales_matter():
    """Swapping the nibbles of K or using another head's scale changes the result (the oracle sees it)."""
    args = make_inputs(2, 4, 2, 1, 40, 0, 32, 4, seed=11, density=1.0)
    y = ref.kv_attention(*args)
    swapped = list(args)
    swapped[1] = (args[1] << 4) | (args[1] >> 4)
    assert (ref.kv_attention(*swapped) - y).abs().max() > 1e-2
    flipped = list(args)
    flipped[3] = args[3].flip(0)
    assert (ref.kv_attention(*flipped) - y).abs().max() > 1e-3


def test_validation_errors():
    good = make_inputs(2, 6, 2, 3, 10, 2, 32, 4)

    def with_(i, value):
        a = list(good)
        a[i] = value
        return a

    q, kc, vc, ks, vs, pk, pv, mask, scaling, bits = good
    cases = [
        (with_(0, q.double()), TypeError, "q must be float32"),
        (with_(0, q[0]), ValueError, "q must be 4-D"),
        (with_(1, kc.view(torch.int8)), TypeError, "k_codes with 4 bits must be packed int4"),
        (with_(2, vc[:, :, :5]), ValueError, "differ in shape"),
        (with_(9, 8), TypeError, "k_codes with 8 bits must be int8"),
        (with_(9, 3), ValueError, "bits must be one of"),
        (with_(0, q[..., :31]), ValueError, "even head dim"),
        (with_(0, q[..., :16]), ValueError, "the codes must be"),
        (with_(0, q[:, :5]), ValueError, "multiple of the KV heads"),
        (with_(3, ks[:1]), ValueError, "k_scale must have shape"),
        (with_(4, vs.double()), TypeError, "v_scale must be float32"),
        (with_(5, pk[:, :1]), ValueError, "prefix_k must be"),
        (with_(6, pv[:, :, :1]), ValueError, "prefix_k and prefix_v differ"),
        (with_(5, pk.int()), TypeError, "prefix_k must be a floating"),
        (with_(7, mask.int()), TypeError, "mask must be bool"),
        (with_(7, mask[:, :, :9]), ValueError, "mask must be"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ref.kv_attention(*args)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        OPS.kv_attention(*with_(0, q[:, :5]))  # through the op too


def test_op_is_the_reference_and_opcheck():
    for seed, bits in ((0, 4), (1, 8)):
        args = make_inputs(2, 6, 2, 2, 37, 3, 32, bits, torch.bfloat16, seed=seed)
        assert torch.equal(OPS.kv_attention(*args), ref.kv_attention(*args))
    args = make_inputs(1, 4, 2, 1, 9, 0, 32, 4, seed=2)
    torch.library.opcheck(OPS.kv_attention, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_kernels_are_registered():
    """triton_op finds the launcher's kernels (bare `wrap_triton` calls): AOTAutograd's cache key has them."""
    pytest.importorskip("triton")
    from torch._library.triton import get_triton_kernels_for_op

    names = {k.fn.__name__ for k in get_triton_kernels_for_op("pq_ao::kv_attention")}
    assert names == {"_kv_attention_kernel", "_combine_kernel"}


def _decode_step(q, kc, vc, ks, vs, pk, pv, mask, w):
    out = OPS.kv_attention(q, kc, vc, ks, vs, pk, pv, mask, 0.125, 4)
    return out.transpose(1, 2).flatten(2) @ w  # [B, Tq, Hq * D] @ o_proj


def _step_inputs(seed=5):
    q, kc, vc, ks, vs, pk, pv, mask, _, _ = make_inputs(2, 6, 2, 1, 50, 4, 32, 4, seed=seed)
    return q, kc, vc, ks, vs, pk, pv, mask, torch.randn(6 * 32, 16)


def test_compile_fullgraph_matches_eager():
    """Dynamo + AOTAutograd (the triton_op decomposition into the reference, its fake kernel)."""
    args = _step_inputs()
    torch.compiler.reset()
    got = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got, _decode_step(*args))


@pytest.mark.slow  # ~10 s of inductor C++ compilation on 2 cores
def test_compile_inductor_matches_eager():
    args = _step_inputs(6)
    torch.compiler.reset()
    got = torch.compile(_decode_step, fullgraph=True)(*args)
    torch.testing.assert_close(got, _decode_step(*args), rtol=1e-5, atol=1e-5)


class _Step(torch.nn.Module):
    def forward(self, q, kc, vc, ks, vs, pk, pv, mask, w):
        return _decode_step(q, kc, vc, ks, vs, pk, pv, mask, w)


def test_export_keeps_the_op():
    q, kc, vc, ks, vs, pk, pv, mask, _, _ = make_inputs(1, 4, 2, 1, 20, 2, 32, 4, seed=6)
    args = (q, kc, vc, ks, vs, pk, pv, mask, torch.randn(4 * 32, 8))
    ep = torch.export.export(_Step(), args, strict=True)
    assert "pq_ao.kv_attention.default" in {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.equal(ep.module()(*args), _decode_step(*args))


def test_cuda_branch_dispatch(monkeypatch):
    """The op body calls the Triton launcher for CUDA tensors and falls back to the reference without one."""
    args = make_inputs(1, 4, 2, 1, 12, 1, 32, 4, seed=8)
    calls = []

    def fake_launcher(*a):
        calls.append(len(a))
        return ref.kv_attention(*a) + 1

    monkeypatch.setattr(ops, "_on_cuda", lambda t: True)
    monkeypatch.setattr(ops, "_triton_kv_attention", fake_launcher)
    want = ref.kv_attention(*args)
    assert torch.equal(OPS.kv_attention(*args), want + 1) and calls == [10]
    monkeypatch.setattr(ops, "_triton_kv_attention", None)
    assert torch.equal(OPS.kv_attention(*args), want)
