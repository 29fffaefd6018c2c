"""Every launch of our Triton kernels, recorded instead of run (CPU tensors, `wrap_triton` replaced): what the
inductor-contract and mutation-memo tests inspect."""

from __future__ import annotations

from typing import NamedTuple

import torch

from pq_ao.hadamard import hadamard_factor
from pq_ao.kernels.triton import attention, fp8_linear, gemm, hadamard, quant
from pq_ao.kernels.triton.gemm import GemmConfig, gemv_config

LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


class Launch(NamedTuple):
    name: str  # the kernel function's name
    passed: list  # argument names passed, in order (launch options left out)
    expected: list  # the kernel's argument names
    kernel: object  # the JITFunction
    values: dict  # argument name -> value, launch options included


class _Recorder:
    """Stands in for `wrap_triton(kernel)`: `[grid](*args, **kwargs)` records the launch."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.arg_names)
            passed = names[: len(args)] + [k for k in kwargs if k not in LAUNCH_OPTIONS]
            values = {**dict(zip(names, args)), **kwargs}
            _Recorder.launches.append(Launch(self.kernel.fn.__name__, passed, names, self.kernel, values))

        return launch


def record_launches(monkeypatch) -> list:
    """From now on (for the test), launches are recorded into the returned list instead of run."""
    _Recorder.launches = []
    monkeypatch.setattr(torch.library, "wrap_triton", _Recorder)
    monkeypatch.setattr(attention, "wrap_triton", _Recorder)
    return _Recorder.launches


def _packed(rows: int, k: int, bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8)
    return torch.randint(-8, 8, (rows, k), dtype=torch.int8)


def every_launch():
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
        gemm.gemv_static_linear(torch.randn(1, k), torch.tensor([0.1]), wq, ws, None, a_bits, w_bits, torch.bfloat16)
    x = torch.randn(5, 576)
    had = hadamard_factor(576)[1]
    hadamard.hadamard_transform(x, had)
    hadamard.hadamard_transform(torch.randn(5, 512), None)
    hadamard.hadamard_quantize_static(x, had, torch.tensor([0.1]), 4)
    quant.quantize_static(x, torch.tensor([0.1]), 4)
    quant.quantize_static_e4m3(x, torch.tensor([0.1]))
    hadamard.hadamard_quantize_static_e4m3(torch.randn(600, 576), had, torch.tensor([0.1]))  # the row loop
    fp8_linear.widen_int4_e4m3(_packed(48, 256, 4))
    quant.quantize_dynamic(x, 4)
    for bits in (4, 8):
        b, hq, hkv, s, d, p = 2, 8, 2, 3000, 64, 3
        q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
        codes = _packed(b * hkv * s, d, bits).view(b, hkv, s, -1)
        scale = torch.rand(hkv) + 0.1
        prefix = torch.randn(1, hkv, p, d, dtype=torch.bfloat16)
        mask = torch.ones(b, 1, s, dtype=torch.bool)
        attention.kv_attention(q, codes, codes, scale, scale, prefix, prefix, mask, d**-0.5, bits)
