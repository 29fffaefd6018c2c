"""Tensor subclasses of pq_ao, registered with torchao's allowlists at import (configs from `pq_ao` modules for
`config_from_dict`, `IntxLinearWeight` for torchao's safetensors (de)serialization used by HF `save_pretrained`)."""

from torchao.core.config import ALLOWED_AO_MODULES
from torchao.prototype.safetensors import safetensors_utils as _st

from pq_ao.tensors.intx_weight import IntxLinearWeight

ALLOWED_AO_MODULES.add("pq_ao")
if "IntxLinearWeight" not in _st.ALLOWED_TENSORS_SUBCLASSES:
    _st.ALLOWED_TENSORS_SUBCLASSES.append("IntxLinearWeight")
_st.ALLOWED_CLASSES["IntxLinearWeight"] = IntxLinearWeight

__all__ = ["IntxLinearWeight"]
