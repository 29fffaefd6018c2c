"""What inductor needs from our Triton launches, checked without a GPU (both broke on the H200 only, under torch
2.11, when compiled or exported):

- every launch passes every kernel argument, defaulted ones too: otherwise inductor's mutation analysis fails
  ("Incorrect number of arguments passed to kernel"), treats every input as mutated and re-runs the analysis at
  each call site;
- each kernel's source with its transitive closure (what inductor pastes into a triple-quoted string in the
  generated module) holds no backslash, so it survives that quoting in any torch version.

The launchers run on CPU tensors here with `wrap_triton` replaced by a recorder: nothing is launched.
"""

from __future__ import annotations

import ast

import pytest
import torch
from triton.runtime.jit import JITFunction

from pq_ao.hadamard import hadamard_factor
from pq_ao.kernels.triton import attention, gemm, hadamard, quant
from pq_ao.kernels.triton.gemm import GemmConfig, gemv_config

MODULES = (attention, gemm, hadamard, quant)
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


class _Recorder:
    """Stands in for `wrap_triton(kernel)`: `[grid](*args, **kwargs)` records the argument names passed."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.arg_names)
            passed = names[: len(args)] + [k for k in kwargs if k not in LAUNCH_OPTIONS]
            _Recorder.launches.append((self.kernel.fn.__name__, passed, names))

        return launch


@pytest.fixture
def launches(monkeypatch):
    _Recorder.launches = []
    monkeypatch.setattr(torch.library, "wrap_triton", _Recorder)
    monkeypatch.setattr(attention, "wrap_triton", _Recorder)
    return _Recorder.launches


def _packed(rows: int, k: int, bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8)
    return torch.randint(-8, 8, (rows, k), dtype=torch.int8)


def _every_launch():
    """Drive each launcher through each of its kernels and branches."""
    n, k = 96, 256
    for a_bits, w_bits in ((4, 4), (8, 4), (8, 8)):
        ws = torch.rand(n) + 0.5
        wq = _packed(n, k, w_bits)
        for m, cfg in ((64, GemmConfig(32, 32, 64, 4, 2, split_k=2)), (1, gemv_config(1, n, k, w_bits)),
                       (1, gemv_config(1, n, k, w_bits, split_k=2))):  # fmt: skip
            xq = _packed(m, k, a_bits)
            for xs in (torch.tensor([0.1]), torch.rand(m, 1) + 0.05):
                for bias in (None, torch.randn(n)):
                    gemm.int_linear_with_config(xq, xs, wq, ws, bias, a_bits, w_bits, torch.bfloat16, cfg)
        gemm.static_linear(torch.randn(1, k), torch.tensor([0.1]), wq, ws, None, a_bits, w_bits, torch.bfloat16)
    x = torch.randn(5, 576)
    had = hadamard_factor(576)[1]
    hadamard.hadamard_transform(x, had)
    hadamard.hadamard_transform(torch.randn(5, 512), None)
    hadamard.hadamard_quantize_static(x, had, torch.tensor([0.1]), 4)
    quant.quantize_static(x, torch.tensor([0.1]), 4)
    quant.quantize_dynamic(x, 4)
    for bits in (4, 8):
        b, hq, hkv, s, d, p = 2, 8, 2, 3000, 64, 3
        q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
        codes = _packed(b * hkv * s, d, bits).view(b, hkv, s, -1)
        scale = torch.rand(hkv) + 0.1
        prefix = torch.randn(1, hkv, p, d, dtype=torch.bfloat16)
        mask = torch.ones(b, 1, s, dtype=torch.bool)
        attention.kv_attention(q, codes, codes, scale, scale, prefix, prefix, mask, d**-0.5, bits)


def test_every_launch_passes_every_kernel_argument(launches):
    _every_launch()
    kernels = {name for name, _, _ in launches}
    assert {"_int_linear_kernel", "_int_gemv_kernel", "_hadamard_kernel", "_quantize_static_kernel",
            "_quantize_dynamic_kernel", "_kv_attention_kernel", "_combine_kernel"} <= kernels, kernels  # fmt: skip
    for name, passed, expected in launches:
        assert len(passed) == len(set(passed)), f"{name}: an argument passed twice: {passed}"
        assert set(passed) == set(expected), f"{name}: missing {set(expected) - set(passed)}"


def _kernels():
    return sorted({(m.__name__, k) for m in MODULES for k, v in vars(m).items()
                   if isinstance(v, JITFunction) and k.endswith("_kernel")})  # fmt: skip


@pytest.mark.parametrize("module,name", _kernels())
def test_kernel_source_survives_inductor_quoting(module, name):
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    kernel = getattr(next(m for m in MODULES if m.__name__ == module), name)
    src = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    assert "\\" not in src, f"{name}: a backslash in the kernel's closure source: {src[src.index(chr(92)) - 80 :][:160]}"
    assert "'''" not in src
    compile(ast.literal_eval("'''" + src + "'''"), name, "exec")  # quoted and unquoted as the generated module is
