"""PrefixQuant configurations: one `AOBaseConfig` dataclass and the paper's presets.

`PrefixQuantConfig` describes a whole-model transform (rotation, prefix, calibration, conversion); `pq_ao.quantize_`
runs it. Every field is validated in `__post_init__`, so a bad combination fails before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torchao.core.config import AOBaseConfig

ACT_MODES = ("static", "dynamic")
KV_GRANULARITIES = ("per_head", "per_tensor")


@dataclass
class PrefixQuantConfig(AOBaseConfig):
    """PrefixQuant W{w_bits}A{a_bits}KV{kv_bits}.

    Quantizers are symmetric. Weights: per output channel. Activations: at the four linear-input sites (q/k/v
    share one, gate/up share one, o_proj, down_proj after R4), one static scale per tensor (`act_mode="static"`,
    the paper's O2) or per token at run time (`"dynamic"`: the QuaRot baseline, or the paper's O1 with a prefix).
    K and V: static per KV head (`kv_granularity="per_head"`) or per tensor, or dynamic per token and head.
    `a_bits`/`kv_bits` = 16 leaves that tensor in full precision.

    Clip factors multiply the min-max range (static) or each token's absmax (dynamic). `act_clip` / `kv_clip` fix
    them for every activation site / every K and V quantizer (QuaRot's recipe: 0.9 and 0.95); None (default) lets
    the grid search choose them. Weights always get the per-channel search when `grid_search` is on.

    `gptq`: the weights are rounded by GPTQ (`pq_ao.calibration.gptq`: error feedback through the inverse Hessian
    of each linear's inputs, gathered per block on the quantized model's hidden states with the prefix present) on
    the same per-channel grid (min-max, or the clip factors of the grid search); `gptq_damp` is the damping as a
    fraction of the mean Hessian diagonal, `gptq_block_size` the columns per lazy batch update, `gptq_act_order` rounds
    the columns by decreasing Hessian diagonal (act-order) instead of in their natural order. GPTQ's Hessians come
    from the grid calibration's tokens: give it many more tokens than the widest linear input (`quantize_` warns
    below 8x; the CPU defaults, 2 x 512, are far too few for GPTQ).

    `finetune`: block-wise fine-tuning after each block's grid search (`pq_ao.calibration.finetune`, EfficientQAT's
    Block-AP as the paper uses it): `ft_samples x ft_seqlen` tokens, `ft_epochs` epochs of `ft_batch_size`, AdamW on
    the weights (`ft_lr_weight`) and on every quantizer scale (`ft_lr_scale`; 0 keeps the calibrated scales; with
    `gptq` the weight scales always stay, GPTQ's codes being tied to them), cosine to a tenth. The defaults suit a
    CPU; the paper's W4A4KV4 setting is 512 x 1024 tokens and 20 epochs (a GPU).

    `fuse_projections`: at the end, q/k/v and gate/up (the linears of one activation site) become one linear each
    (`pq_ao.passes.fuse`): one quantized input and one GEMM per site, the same results. The model then has
    `self_attn.qkv_proj` and `mlp.gate_up_proj` instead; `pq_ao.passes.unfuse_projections` gives the separate
    linears back.

    Calibration data: a LongTensor of token ids `[n, seqlen]`, a list of strings (tokenized with the model's
    tokenizer), or a dataset name from `pq_ao.data` (default `"c4"`). `n_samples x seqlen` tokens feed the outlier
    search; `grid_samples x grid_seqlen` feed the block-wise calibration (min-max statistics and grid search).
    The defaults (32 x 512, 2 x 512) quantize a 135M model in about 90 s on a 2-core CPU; the paper used 64 x 512
    and 8 x 1024 (pass them for fidelity on a GPU: the calibration costs ~32 block passes per block over its
    tokens).
    """

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    act_mode: str = "static"
    kv_mode: str = "static"
    kv_granularity: str = "per_head"
    rotate: bool = True
    prefix: bool = True
    eta: float = 64.0
    max_prefix_len: int = 8
    calibration: Any = "c4"
    n_samples: int = 32
    seqlen: int = 512
    grid_search: bool = True
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False
    finetune: bool = False
    ft_samples: int = 32
    ft_seqlen: int = 512
    ft_epochs: int = 2
    ft_batch_size: int = 1
    ft_lr_weight: float = 5e-6
    ft_lr_scale: float = 5e-5
    act_clip: float | None = None
    kv_clip: float | None = None
    grid_samples: int = 2
    grid_seqlen: int = 512
    seed: int = 0
    fuse_projections: bool = True
    version: int = field(default=1, repr=False)

    def __post_init__(self):
        torch._C._log_api_usage_once("pq_ao.PrefixQuantConfig")
        if self.w_bits not in (4, 8):
            raise ValueError(f"w_bits must be 4 or 8, got {self.w_bits}")
        for name in ("a_bits", "kv_bits"):
            if getattr(self, name) not in (4, 8, 16):
                raise ValueError(f"{name} must be 4, 8 or 16 (16 = not quantized), got {getattr(self, name)}")
        for name in ("act_mode", "kv_mode"):
            if getattr(self, name) not in ACT_MODES:
                raise ValueError(f"{name} must be one of {ACT_MODES}, got {getattr(self, name)!r}")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise ValueError(f"kv_granularity must be one of {KV_GRANULARITIES}, got {self.kv_granularity!r}")
        if self.eta <= 1:
            raise ValueError(f"eta (outlier threshold over the median) must be > 1, got {self.eta}")
        if self.max_prefix_len < 1:
            raise ValueError(f"max_prefix_len must be >= 1, got {self.max_prefix_len}")
        for name in ("act_clip", "kv_clip"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1] (or None to search it), got {value}")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq_damp (a fraction of the mean Hessian diagonal) must be in [0, 1), got {self.gptq_damp}")
        if not self.ft_lr_weight > 0:
            raise ValueError(f"ft_lr_weight must be > 0, got {self.ft_lr_weight}")
        if not self.ft_lr_scale >= 0:
            raise ValueError(f"ft_lr_scale must be >= 0 (0: the scales stay as calibrated), got {self.ft_lr_scale}")
        for name in ("n_samples", "seqlen", "grid_samples", "grid_seqlen", "gptq_block_size", "ft_samples",
                     "ft_seqlen", "ft_epochs", "ft_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.calibration, torch.Tensor):
            if self.calibration.dtype != torch.long or self.calibration.dim() != 2 or self.calibration.numel() == 0:
                raise ValueError(
                    "calibration token ids must be a non-empty LongTensor [n, seqlen], got "
                    f"{self.calibration.dtype} {tuple(self.calibration.shape)}"
                )
        elif isinstance(self.calibration, (list, tuple)):
            if not self.calibration or not all(isinstance(t, str) for t in self.calibration):
                raise ValueError("calibration as a list must be a non-empty list of strings")
        elif not isinstance(self.calibration, str):
            raise TypeError(
                "calibration must be a LongTensor [n, seqlen], a list of strings or a dataset name, "
                f"got {type(self.calibration).__name__}"
            )

    @property
    def name(self) -> str:
        kv = f"kv{self.kv_bits}" if self.kv_bits < 16 else ""
        base = f"w{self.w_bits}a{self.a_bits}{kv}"
        gptq = ("-gptq" if self.gptq else "") + ("-ft" if self.finetune else "")
        if self.act_mode == "dynamic" and not self.prefix:
            return f"quarot-{base}{gptq}"
        return (base if self.act_mode == "static" else f"{base}-dynamic") + gptq

    def to_dict(self) -> dict:
        """JSON-safe fields (a token-id tensor is recorded by its shape only)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = f"<token ids {list(value.shape)}>"
            elif isinstance(value, (list, tuple)):
                value = f"<{len(value)} strings>"
            out[f.name] = value
        return out


def prefixquant_w4a4(**kwargs) -> PrefixQuantConfig:
    """W4A4KV4: static per-tensor 4-bit activations, static per-head 4-bit KV (paper O2)."""
    return PrefixQuantConfig(**{"w_bits": 4, "a_bits": 4, "kv_bits": 4, **kwargs})


def prefixquant_w4a8(**kwargs) -> PrefixQuantConfig:
    """W4A8KV4: static per-tensor 8-bit activations, static per-head 4-bit KV."""
    return PrefixQuantConfig(**{"w_bits": 4, "a_bits": 8, "kv_bits": 4, **kwargs})


def prefixquant_w8a8(**kwargs) -> PrefixQuantConfig:
    """W8A8KV8: static per-tensor 8-bit activations and 8-bit per-tensor static KV."""
    return PrefixQuantConfig(**{"w_bits": 8, "a_bits": 8, "kv_bits": 8, "kv_granularity": "per_tensor", **kwargs})


QUAROT_ACT_CLIP, QUAROT_KV_CLIP = 0.9, 0.95  # QuaRot's published recipe (--a_clip_ratio, --k/v_clip_ratio)


def quarot_w4a4(**kwargs) -> PrefixQuantConfig:
    """The QuaRot-style baseline on the same rotated model: per-token dynamic 4-bit activations (clip 0.9),
    per-token-per-head dynamic 4-bit KV (clip 0.95), no prefix; the same weight quantization as `prefixquant_w4a4`.
    `act_clip=None, kv_clip=None` gives it searched clip factors instead (the paper's O1 without the prefix)."""
    return PrefixQuantConfig(**{"w_bits": 4, "a_bits": 4, "kv_bits": 4, "act_mode": "dynamic", "kv_mode": "dynamic",
                                "prefix": False, "act_clip": QUAROT_ACT_CLIP, "kv_clip": QUAROT_KV_CLIP, **kwargs})


PRESETS = {
    "w4a4kv4": prefixquant_w4a4,
    "w4a8kv4": prefixquant_w4a8,
    "w8a8kv8": prefixquant_w8a8,
    "quarot-w4a4kv4": quarot_w4a4,
}


def preset(name: str, **kwargs) -> PrefixQuantConfig:
    try:
        return PRESETS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown config {name!r}; known: {sorted(PRESETS)}") from None
