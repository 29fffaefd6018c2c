"""The quantization grid shared by calibration, the tensor subclasses and the kernels.

Contract (docs/architecture.md), symmetric, `b` bits in {4, 8}:

    qmin, qmax = -2**(b-1), 2**(b-1) - 1
    s          = 2 * max(clip * absmax, ABSMAX_EPS) / (2**b - 1)     (fp32; one rounding when clip == 1)
    q          = clamp(round_half_even(x.float() / s), qmin, qmax)   (division, never a reciprocal multiply)
    x_hat      = q * s

int4 storage packs two values per byte along the last dim: element 2i in the low nibble, 2i+1 in the high
nibble, two's complement nibbles, uint8 `[..., K // 2]`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)

# Floor on absmax before it becomes a scale: an all-zero row/tensor gets a tiny positive scale (and q == 0)
# instead of 0 (x / 0 = nan). The Triton dynamic quantizer uses the same floor.
ABSMAX_EPS = 1e-8


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the symmetric signed grid: (-8, 7) for 4 bits, (-128, 127) for 8."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_absmax(absmax: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Min-max scale `2 * max(clip * absmax, ABSMAX_EPS) / (2**b - 1)` in fp32 (the paper's: +absmax lands on
    qmax + 1/2 and is clipped by half a step). `clip` is a float or a tensor broadcastable to absmax."""
    check_bits(bits)
    a = absmax.float()
    if not (isinstance(clip, (int, float)) and clip == 1.0):
        a = a * (clip.float() if isinstance(clip, torch.Tensor) else float(clip))
    num = a.clamp_min(ABSMAX_EPS) * 2.0
    # a tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal (1 ulp off)
    return num / torch.full_like(num, float(2**bits - 1))


def per_token_scale(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Dynamic per-token scale: absmax over the last dim, shape `[..., 1]`, fp32."""
    return scale_from_absmax(x.abs().amax(dim=-1, keepdim=True), bits, clip)


def per_channel_scale(w: torch.Tensor, bits: int, clip: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel weight scale: `w` is `[N, K]`, absmax over K, optional clip factors (float or `[N]`);
    returns `[N]` fp32."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if isinstance(clip, torch.Tensor) and clip.shape != (w.shape[0],):
        raise ValueError(f"clip must have shape [{w.shape[0]}] (one factor per output channel), got {tuple(clip.shape)}")
    return scale_from_absmax(w.abs().amax(dim=-1), bits, 1.0 if clip is None else clip)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`clamp(round_half_even(x / scale), qmin, qmax)` as int8 (unpacked); `scale` broadcasts against x."""
    qmin, qmax = qrange(bits)
    return torch.round(x.float() / scale.float()).clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` in fp32, cast to `dtype`; `q` is unpacked int8."""
    if q.dtype != torch.int8:
        raise TypeError(f"dequantize expects unpacked int8 values, got {q.dtype} (unpack_int4 packed data first)")
    return (q.float() * scale.float()).to(dtype)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    # Forward: exactly round(v) (round(v) - v is exact in fp32). Backward: identity.
    return v + (torch.round(v) - v).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize, returned in x.dtype. With `ste=True` the rounding passes gradients straight through
    (to x and, LSQ-style, to scale); values are identical either way."""
    qmin, qmax = qrange(bits)
    s = scale.float()
    v = x.float() / s
    q = _round_ste(v) if ste else torch.round(v)
    return (q.clamp(qmin, qmax) * s).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 `[..., K]` with values in [-8, 7] -> uint8 `[..., K // 2]`, element 2i in the low nibble."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    u = q.view(torch.uint8)  # two's complement bits; the low nibble of each byte is the int4 value
    return (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., K // 2]` -> int8 `[..., K]` (sign-extended nibbles); inverse of `pack_int4`."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects packed uint8, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dim")
    lo = (p << 4).view(torch.int8) >> 4  # arithmetic shift sign-extends the nibble
    hi = p.view(torch.int8) >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)
