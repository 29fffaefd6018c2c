"""`pq_ao.numerics`: compiling with eager's rounding. The context leaves inductor as it found it, and a decode
package compiled inside it gives eager's logits bit for bit, step after step."""

import pytest
import torch
from torch._inductor import decomposition, lowering
from torch._inductor.package import package_aoti

import pq_ao
from pq_ao import numerics, runtime
from pq_ao.config import preset
from pq_ao.export import CacheProgram, aot_compile_program, example_inputs, export_programs

MAX_LEN = 40


def test_eager_numerics_patches_inductor_and_restores_it():
    mean, silu = torch.ops.aten.mean.dim, torch.ops.aten.silu.default
    before = (lowering.lowerings[mean], decomposition.decompositions[silu], list(lowering.fallbacks),
              list(lowering.needs_realized_inputs))  # fmt: skip
    assert mean not in lowering.fallbacks
    with numerics.eager_numerics() as options:
        assert mean in lowering.fallbacks and lowering.lowerings[mean] is not before[0]
        assert silu not in decomposition.decompositions and silu not in decomposition.select_decomp_table()
        assert torch._inductor.config.force_disable_caches
        assert options.get("emulate_precision_casts") is True
    after = (lowering.lowerings[mean], decomposition.decompositions[silu], list(lowering.fallbacks),
             list(lowering.needs_realized_inputs))  # fmt: skip
    assert after[0] is before[0] and after[1] is before[1] and after[2:] == before[2:]
    assert silu in decomposition.select_decomp_table()


def test_unknown_numerics_is_refused():
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics.compiling("fast")


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="no GPU")])]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_eager_numerics_decode_package_is_bitwise_eager(device, tmp_path):
    """On CUDA the eager side runs pq_ao's Triton kernels and ATen's CUDA kernels, the package the same Triton
    kernels, ATen's kernels for the fallbacks and inductor's code for the rest."""
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32, device=device)
    pq_ao.quantize_(model, preset("w4a4kv4", n_samples=4, seqlen=128, grid_samples=1, grid_seqlen=128),
                    tokenizer=tok)  # fmt: skip
    spec, eps = export_programs(model, 1, MAX_LEN, programs=("decode",))
    assert spec["device"] == device
    pt2 = tmp_path / "decode.pt2"
    package_aoti(str(pt2), {"decode": aot_compile_program(eps["decode"], "decode", spec, numerics="eager")})
    runtime.preload_libstdcxx()  # what runtime.load does first (the GPU box needs it)
    decode = runtime.load_programs(pt2)["decode"]
    assert decode.get_metadata()["numerics"] == "eager"
    eager = CacheProgram(model).eval()
    ids = tok("Once upon a time there was a little", add_special_tokens=False, return_tensors="pt").input_ids
    ids = ids.to(device)
    _, length, *kv = example_inputs(spec, 2, device)
    _, length_ref, *kv_ref = example_inputs(spec, 2, device)
    logits, logits_ref = eager(ids, length, *kv), eager(ids, length_ref, *kv_ref)
    for _ in range(12):
        nxt = logits_ref.argmax(-1, keepdim=True)
        logits, logits_ref = decode(nxt, length, *kv), eager(nxt, length_ref, *kv_ref)
        assert torch.equal(logits, logits_ref), float((logits - logits_ref).norm() / logits_ref.norm())
    assert int(length) == int(length_ref) == ids.shape[1] + 12
    assert all(torch.equal(a, b) for a, b in zip(kv, kv_ref))
