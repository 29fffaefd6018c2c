"""pq_ao: PrefixQuant (static W4A4KV4 with prefixed outlier tokens) for torchao, torch.compile and AOTInductor."""

from pq_ao import _torchao_import  # noqa: F401, I001  (first: torchao imported without its start-up noise)
from pq_ao import kernels as _kernels  # noqa: F401  (registers the pq_ao:: ops)
from pq_ao.api import QuantizationReport, quantize_
from pq_ao.config import (
    PrefixQuantConfig,
    prefixquant_w4a4,
    prefixquant_w4a8,
    prefixquant_w8a8,
    quarot_w4a4,
)
from pq_ao.models import load_model
from pq_ao.reporting import report
from pq_ao.serialization import load_quantized, save_quantized
from pq_ao.tensors import IntxLinearWeight

__all__ = [
    "IntxLinearWeight",
    "PrefixQuantConfig",
    "QuantizationReport",
    "load_model",
    "load_quantized",
    "prefixquant_w4a4",
    "prefixquant_w4a8",
    "prefixquant_w8a8",
    "quantize_",
    "quarot_w4a4",
    "report",
    "save_quantized",
]
