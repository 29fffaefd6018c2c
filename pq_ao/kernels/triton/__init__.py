"""Triton kernels (CUDA) for the `pq_ao::` ops; each launcher has the signature of its plain-torch reference in
`pq_ao.kernels.reference` and launches through `torch.library.wrap_triton`, so torch.compile, torch.export and
AOTInductor trace the kernels into their artifacts. Design and measurements: docs/kernels.md."""

from .attention import AttnConfig, kv_attention, kv_attention_with_config
from .fp8_linear import e4m3_int4_linear, widen_int4_e4m3
from .gemm import GemmConfig, int_linear, int_linear_with_config, pick_config
from .hadamard import hadamard_quantize_static, hadamard_quantize_static_e4m3, hadamard_transform
from .linear import static_linear, swiglu_static_linear
from .quant import quantize_dynamic, quantize_static, quantize_static_e4m3

__all__ = [
    "hadamard_transform",
    "quantize_static",
    "hadamard_quantize_static",
    "quantize_dynamic",
    "int_linear",
    "kv_attention",
    "kv_attention_with_config",
    "AttnConfig",
    "int_linear_with_config",
    "static_linear",
    "swiglu_static_linear",
    "quantize_static_e4m3",
    "hadamard_quantize_static_e4m3",
    "widen_int4_e4m3",
    "e4m3_int4_linear",
    "pick_config",
    "GemmConfig",
]
