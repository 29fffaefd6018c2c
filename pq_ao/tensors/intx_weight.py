"""`IntxLinearWeight`: a linear weight quantized per output channel (int4 packed or int8), carrying how the
linear's input is quantized, so that `F.linear(x, w, b)` runs the integer kernel.

Invariants:
- `qdata` is packed uint8 `[N, K // 2]` (w_bits 4) or int8 `[N, K]` (w_bits 8); `scale` is fp32 `[N]`;
  the logical tensor is `dequantize() = qdata * scale[:, None]`, shape `[N, K]`, dtype `dtype`.
- `act_mode` "static": `act_scale` is fp32 `[1]`; "dynamic": per-token scales at run time, times the optional
  clip factor `act_clip` (fp32 `[1]`, from the grid search); "none" (a_bits 16): weight-only, x meets the
  dequantized weight.
- `had_k` (K_h x K_h, K = K_h * 2**m): the input is first rotated by the orthonormal online Hadamard
  `x @ (had_k (kron) H_{2^m}).T / sqrt(K)`; the weight is expected to be rotated to match already (the rotation
  pass does that), this class never rotates it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from pq_ao import hadamard, quant_math
from pq_ao.kernels import ops, reference

__all__ = ["IntxLinearWeight", "swiglu_linear"]

aten = torch.ops.aten

ACT_MODES = ("static", "dynamic", "none")


def _check_config(w_bits: int, a_bits: int, act_mode: str) -> None:
    quant_math.check_bits(w_bits)
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
    if (act_mode == "none") != (a_bits == 16):
        raise ValueError(f"a_bits=16 goes with act_mode='none' and only with it; got a_bits={a_bits}, {act_mode=}")
    if a_bits != 16:
        quant_math.check_bits(a_bits)


class IntxLinearWeight(TorchAOBaseTensor):
    """Per-output-channel symmetric int4/int8 linear weight with static/dynamic/no activation quantization.

    Tensor data: `qdata`, `scale`; optional `act_scale` (static), `had_k` (online Hadamard of the input), `act_clip`
    (dynamic).
    Attributes: `w_bits` (4 | 8), `a_bits` (4 | 8 | 16), `act_mode` ("static" | "dynamic" | "none"), `shape`,
    `dtype` (the logical [N, K] weight).
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["w_bits", "a_bits", "act_mode", "shape", "dtype"]
    optional_tensor_data_names = ["act_scale", "had_k", "act_clip"]

    def __new__(cls, qdata, scale, w_bits, a_bits, act_mode, shape, dtype, act_scale=None, had_k=None, act_clip=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, w_bits, a_bits, act_mode, shape, dtype, act_scale=None, had_k=None, act_clip=None):
        super().__init__()
        _check_config(w_bits, a_bits, act_mode)
        n, k = shape
        want = (n, k // 2) if w_bits == 4 else (n, k)
        if tuple(qdata.shape) != want or qdata.dtype != (torch.uint8 if w_bits == 4 else torch.int8):
            raise ValueError(f"qdata for a [{n}, {k}] W{w_bits} weight must be {list(want)} "
                             f"{'uint8 (packed int4)' if w_bits == 4 else 'int8'}, got {list(qdata.shape)} {qdata.dtype}")
        if tuple(scale.shape) != (n,) or scale.dtype != torch.float32:
            raise ValueError(f"scale must be float32 [{n}], got {list(scale.shape)} {scale.dtype}")
        if (act_scale is not None) != (act_mode == "static"):
            raise ValueError(f"act_scale is required for act_mode='static' and only for it ({act_mode=})")
        if act_scale is not None and (tuple(act_scale.shape) != (1,) or act_scale.dtype != torch.float32):
            raise ValueError(f"act_scale must be float32 [1], got {list(act_scale.shape)} {act_scale.dtype}")
        if act_clip is not None and act_mode != "dynamic":
            raise ValueError(f"act_clip goes with act_mode='dynamic' only ({act_mode=})")
        if act_clip is not None and (tuple(act_clip.shape) != (1,) or act_clip.dtype != torch.float32):
            raise ValueError(f"act_clip must be float32 [1], got {list(act_clip.shape)} {act_clip.dtype}")
        if had_k is not None:
            kh = had_k.shape[0]
            if had_k.dim() != 2 or had_k.shape[1] != kh or k % kh or not hadamard.is_pow2(k // kh):
                raise ValueError(f"had_k must be K_h x K_h with K = {k} = K_h * 2**m, got {list(had_k.shape)}")
        self.qdata, self.scale = qdata, scale
        self.w_bits, self.a_bits, self.act_mode = w_bits, a_bits, act_mode
        self.act_scale, self.had_k, self.act_clip = act_scale, had_k, act_clip

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        w_bits: int,
        a_bits: int,
        act_mode: str,
        act_scale: torch.Tensor | float | None = None,
        had_k: torch.Tensor | None = None,
        clip: torch.Tensor | float | None = None,
        w_scale: torch.Tensor | None = None,
        act_clip: torch.Tensor | float | None = None,
    ) -> "IntxLinearWeight":
        """Quantize a float `[N, K]` weight (already rotated if `had_k` is given).

        `w_scale` (fp32 `[N]`) is used as is; otherwise it is the min-max scale times `clip` (per-channel clip
        factors `[N]` or a float). `act_scale` (static) and `act_clip` (dynamic; a float or a 1-element tensor)
        become fp32 `[1]`.
        """
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D float tensor, got {list(weight.shape)} {weight.dtype}")
        _check_config(w_bits, a_bits, act_mode)
        if w_bits == 4 and weight.shape[1] % 2:
            raise ValueError(f"int4 weights need an even K (in_features), got {weight.shape[1]}")
        if w_scale is None:
            w_scale = quant_math.per_channel_scale(weight, w_bits, clip)
        elif clip is not None:
            raise ValueError("give either w_scale or clip, not both")
        w_scale = w_scale.to(device=weight.device, dtype=torch.float32)
        q = quant_math.quantize(weight, w_scale[:, None], w_bits)
        qdata = quant_math.pack_int4(q) if w_bits == 4 else q
        if act_scale is not None:
            if isinstance(act_scale, torch.Tensor) and act_scale.numel() != 1:
                raise ValueError(f"act_scale must hold one value (per-tensor), got shape {list(act_scale.shape)}")
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32, device=weight.device).reshape(1).clone()
        if had_k is not None:
            had_k = had_k.to(device=weight.device, dtype=torch.float32)
        if act_clip is not None:
            act_clip = torch.as_tensor(act_clip, dtype=torch.float32, device=weight.device).reshape(1).clone()
        return cls(qdata, w_scale, w_bits, a_bits, act_mode, weight.shape, weight.dtype, act_scale, had_k, act_clip)

    def same_input_quantization(self, other: "IntxLinearWeight") -> bool:
        """Whether `other` quantizes its input exactly as this weight does (bits, mode, K, online Hadamard and the
        activation range's value), so that one quantized input can feed both (`pq_ao.nn.fused_linear`)."""

        def same(a, b):
            return (a is None) == (b is None) and (a is None or (a.device == b.device and torch.equal(a, b)))

        return (self.w_bits, self.a_bits, self.act_mode, self.dtype, self.shape[1], self.qdata.device) == (
            other.w_bits, other.a_bits, other.act_mode, other.dtype, other.shape[1], other.qdata.device
        ) and same(self.act_range, other.act_range) and same(self.had_k, other.had_k)  # fmt: skip

    @classmethod
    def concat(cls, weights: list["IntxLinearWeight"]) -> "IntxLinearWeight":
        """The weights stacked along the output channels, `[sum N_i, K]`: one GEMM computes every output of linears
        that read one input. They must quantize that input alike (`same_input_quantization`)."""
        first = weights[0]
        for i, w in enumerate(weights[1:], 1):
            if not first.same_input_quantization(w):
                raise ValueError(f"weight {i} quantizes its input differently from weight 0 (bits, mode, K, online "
                                 "Hadamard or activation range): they cannot share one quantized input")
        n = sum(w.shape[0] for w in weights)
        return cls(torch.cat([w.qdata for w in weights]), torch.cat([w.scale for w in weights]), first.w_bits,
                   first.a_bits, first.act_mode, (n, first.shape[1]), first.dtype, *first._input_tensors_copy())

    def out_rows(self, start: int, length: int) -> "IntxLinearWeight":
        """Output channels `start .. start + length - 1` as a weight of their own (its code and scale tensors are
        views of this one's; the small activation tensors are copies)."""
        if not 0 <= start <= start + length <= self.shape[0]:
            raise ValueError(f"rows {start}..{start + length} are outside a weight of {self.shape[0]} output channels")
        return IntxLinearWeight(self.qdata.narrow(0, start, length), self.scale.narrow(0, start, length), self.w_bits,
                                self.a_bits, self.act_mode, (length, self.shape[1]), self.dtype,
                                *self._input_tensors_copy())  # fmt: skip

    def _input_tensors_copy(self) -> tuple[torch.Tensor | None, ...]:
        """Copies of (act_scale, had_k, act_clip), the small tensors of how the input is quantized."""
        return tuple(None if t is None else t.clone() for t in (self.act_scale, self.had_k, self.act_clip))

    @property
    def act_range(self) -> torch.Tensor | None:
        """What sets the activation grid, fp32 `[1]`: the static scale (`act_mode` "static") or the clip factor on
        each token's absmax ("dynamic"); None for weight-only."""
        return {"static": self.act_scale, "dynamic": self.act_clip}.get(self.act_mode)

    @torch.no_grad()
    def set_act_range(self, value: torch.Tensor | float) -> None:
        """Set `act_range` in place (calibration's search writes here; compiled graphs that read it see the new
        value)."""
        target = self.act_range
        if target is None:
            raise ValueError(f"a weight with act_mode={self.act_mode!r} has no activation range to set")
        target.copy_(torch.as_tensor(value, dtype=torch.float32, device=target.device).reshape(1))

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        q = quant_math.unpack_int4(self.qdata) if self.w_bits == 4 else self.qdata
        return quant_math.dequantize(q, self.scale[:, None], output_dtype or self.dtype)

    def _stable_hash_for_caching(self) -> str:
        """Metadata-only key for the AOTAutograd cache (inner tensors are graph inputs, not constants)."""
        inner = [(name, tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type)
                 for name in self.__tensor_flatten__()[0] for t in [getattr(self, name)]]
        key = (type(self).__qualname__, tuple(self.shape), self.dtype, self.w_bits, self.a_bits, self.act_mode,
               self.requires_grad, inner)
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        table = cls._ATEN_OP_TABLE[cls]
        if func in table:
            return table[func](func, types, args, kwargs or {})
        raise NotImplementedError(
            f"{cls.__name__} does not implement {func}; it supports linear (F.linear / aten.linear), detach, clone, "
            f"copy_, to / _to_copy (device and logical dtype). Use .dequantize() for a plain tensor."
        )


implements = IntxLinearWeight.implements
implements_torch_function = IntxLinearWeight.implements_torch_function


def _quantized_linear(x: torch.Tensor, w: IntxLinearWeight, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if w.act_mode == "none":
        if w.had_k is not None:
            x2 = ops.hadamard_transform(x2, w.had_k)
        y = F.linear(x2, w.dequantize(x.dtype), bias)
    else:
        if w.act_mode == "static":
            # x detached: rounding has zero derivative (as with the separate quantize op, whose integer output
            # ends the graph), so nothing upstream gets a gradient through here; the bias does
            y = ops.static_linear(x2.detach(), w.act_scale, w.had_k, w.qdata, w.scale, bias, w.a_bits, w.w_bits,
                                  x.dtype)
        else:
            if w.had_k is not None:
                x2 = ops.hadamard_transform(x2, w.had_k)
            xq, x_scale = ops.quantize_dynamic(x2, w.a_bits, w.act_clip)
            y = ops.int_linear(xq, x_scale, w.qdata, w.scale, bias, w.a_bits, w.w_bits, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def swiglu_linear(gate_up: torch.Tensor, w: IntxLinearWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(silu(gate) * up, w, bias)` from a gated MLP's joined gate/up projection `[..., 2K]` (gate first):
    a static weight runs `pq_ao::swiglu_static_linear` (on CUDA the gating happens in its input quantizer), other
    modes the plain form."""
    n, k = w.shape
    if gate_up.shape[-1] != 2 * k:
        raise ValueError(f"gate_up has {gate_up.shape[-1]} features, the weight expects 2 x {k} (gate, then up)")
    if w.act_mode != "static":
        return F.linear(reference.swiglu(gate_up), w, bias)
    y = ops.swiglu_static_linear(gate_up.reshape(-1, 2 * k).detach(), w.act_scale, w.had_k, w.qdata, w.scale, bias,
                                 w.a_bits, w.w_bits, gate_up.dtype)  # fmt: skip
    return y.reshape(*gate_up.shape[:-1], n)


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, IntxLinearWeight) or isinstance(x, IntxLinearWeight):
        raise NotImplementedError(f"{func}: only a plain input times an IntxLinearWeight weight is supported")
    return _quantized_linear(x, w, bias)


def _moved(self: IntxLinearWeight, device, dtype, non_blocking: bool = False) -> IntxLinearWeight:
    """A new IntxLinearWeight on `device` with logical dtype `dtype`; the quantized data keeps its own dtype."""

    def move(t):
        return None if t is None else t.to(device, non_blocking=non_blocking)

    return IntxLinearWeight(move(self.qdata), move(self.scale), self.w_bits, self.a_bits, self.act_mode, self.shape,
                            dtype, move(self.act_scale), move(self.had_k), move(self.act_clip))  # fmt: skip


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """Device moves and logical-dtype changes (model.to(bfloat16)). A fresh tensor: nothing aliases."""
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    return _moved(self, to["device"], to["dtype"], to["non_blocking"])


@implements(aten.to.dtype_layout)
def _(func, types, args, kwargs):
    """`Tensor.to(device=..., dtype=...)`: self when nothing changes, else a moved copy. (torchao's shared version
    'corrects' the aliasing of a cross-device copy, which torch >= 2.11 refuses.)"""
    self = args[0]
    device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else self.device
    dtype = kwargs.get("dtype") or self.dtype
    if device == self.device and dtype == self.dtype and not kwargs.get("copy", False):
        return self
    return _moved(self, device, dtype, kwargs.get("non_blocking", False))


IntxLinearWeight.__module__ = "pq_ao.tensors"
torch.serialization.add_safe_globals([IntxLinearWeight])
