"""`PrefixAttention`: the attention module of a PrefixQuant model.

It replaces an HF decoder attention module (the q/k/v/o projections, optional per-head q_norm/k_norm, RoPE through
the model's `position_embeddings`) and adds, in this order after RoPE:

1. R3: the orthonormal head_dim Hadamard on Q and K (`rotate_qk`). Q.K is unchanged, so logits are too.
2. Static (per KV head) or dynamic (per token and head) quantization of the *new* tokens' K and V; the cache holds
   the quantized values, so every later step reads exactly what an int4/int8 cache would hold.
3. The prefix: constant full-precision K (post-RoPE at positions 0..P-1, post-R3) and V that every query attends to.
   Real tokens sit at positions P.. (see `PrefixPositions`); the HF cache never holds the prefix.
4. With a `QuantizedKVCache`, the new tokens' K/V are stored as int4/int8 codes and attention reads them (decode:
   `pq_ao::kv_attention` on the codes; a prefill into an empty cache without padding: its own decoded codes; any
   other prefill: every decoded slot, masked), with the same values as 2.
5. Without a mask (HF's "pq_ao" masks, `pq_ao.nn.masks`: no padding), queries over their own keys (a forward
   without cache, a prefill into an empty cache) take SDPA's causal kernels with the prefix put in front
   (`_causal_with_prefix`). With a mask (a prefill into a filled cache, padding), compiled CUDA graphs take
   FlexAttention with a block mask (`flex_prefix`), other runs SDPA with the mask materialised.

Invariant: with no prefix, no quantizers and `rotate_qk=False`, outputs equal the wrapped module's (same math).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pq_ao import quant_math
from pq_ao.nn import flex_prefix
from pq_ao.nn.kv_cache import QuantizedKVCache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _default_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _model_rope(attn: nn.Module) -> Callable:
    """The RoPE function of the wrapped module's own modeling file (falls back to the standard rotate-half)."""
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", _default_rope)


class KVQuantizer(nn.Module):
    """Symmetric fake quantization of K or V, `[B, H_kv, T, D]`.

    static: one scale per KV head (`scale` [H_kv]); dynamic: one per token and head, from its absmax times `clip`.
    """

    def __init__(self, bits: int, n_kv_heads: int, mode: str, clip: float = 1.0):
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise ValueError(f"KV quantization mode must be 'static' or 'dynamic', got {mode!r}")
        self.bits, self.mode, self.clip = bits, mode, clip
        self.ste = False  # straight-through rounding (block-wise fine-tuning trains the static scales)
        self.register_buffer("scale", torch.ones(n_kv_heads, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "static":
            scale = self.scale.view(1, -1, 1, 1)
        else:
            scale = quant_math.scale_from_absmax(x.float().abs().amax(-1, keepdim=True), self.bits, self.clip)
        return quant_math.fake_quantize(x, scale, self.bits, ste=self.ste)

    def _apply(self, fn, recurse: bool = True):
        """Scales stay fp32 whatever `model.to(dtype)` does to the model (a bf16 scale would move the grid)."""
        super()._apply(fn, recurse)
        self.scale = self.scale.float()
        return self

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Static codes of x: packed uint8 `[..., D // 2]` (4-bit) or int8 `[..., D]`; `decode(codes(x))` equals
        `forward(x)` exactly."""
        q = quant_math.quantize(x, self.scale.view(1, -1, 1, 1), self.bits)
        return quant_math.pack_int4(q) if self.bits == 4 else q

    def decode(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = quant_math.unpack_int4(codes) if self.bits == 4 else codes
        return quant_math.dequantize(q, self.scale.view(1, -1, 1, 1), dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


class QKVProbe(nn.Module):
    """Identity on (q, k, v): the point where calibration observes the new tokens' Q, K, V (after RoPE and R3,
    before K/V quantization), through forward hooks (`observe_qkv`)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return q, k, v


@contextlib.contextmanager
def observe_qkv(attns: list["PrefixAttention"], fn: Callable) -> Iterator[None]:
    """Within the block, `fn(attn, q, k, v)` sees every call of each attention module's new-token Q, K, V
    `[B, H, T, D]`; the hooks are gone afterwards, whatever happens."""
    handles = [a.qkv_probe.register_forward_hook(lambda _m, args, _out, a=a: fn(a, *args)) for a in attns]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def full_precision_kv(attns: list["PrefixAttention"]) -> Iterator[None]:
    """Within the block, the attention modules run without K/V quantizers and without a prefix (the model as it
    computes the prefix itself); both come back afterwards, whatever happens."""
    saved = [(a.k_quant, a.v_quant, a.prefix_k, a.prefix_v) for a in attns]
    for a in attns:
        a.k_quant = a.v_quant = None
        a.set_prefix(None, None)
    try:
        yield
    finally:
        for a, (kq, vq, pk, pv) in zip(attns, saved):
            a.k_quant, a.v_quant = kq, vq
            a.set_prefix(pk, pv)


class PrefixAttention(nn.Module):
    """Drop-in replacement of an HF attention module; see the module docstring for what it adds."""

    def __init__(self, attn: nn.Module, rotate_qk: bool = False):
        super().__init__()
        cfg = attn.config
        self.config = cfg
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.scaling = attn.scaling
        self.is_causal = True
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(attn, name))
        self.qkv_proj = None  # a FusedLinear in place of q/k/v_proj once `pq_ao.passes.fuse` ran
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self._rope = _model_rope(attn)
        self.rotate_qk = rotate_qk
        if rotate_qk:
            from pq_ao.hadamard import hadamard_factor  # the R3 transform, shared with the kernels

            _, had_k = hadamard_factor(self.head_dim)
            self.register_buffer("r3_had_k", had_k.to(torch.float32), persistent=False)
        self.k_quant: KVQuantizer | None = None
        self.v_quant: KVQuantizer | None = None
        self.register_buffer("prefix_k", None)
        self.register_buffer("prefix_v", None)
        self.qkv_probe = QKVProbe()  # calibration observes q, k, v here (`observe_qkv`)

    @classmethod
    def wrap(cls, attn: nn.Module, rotate_qk: bool = False) -> "PrefixAttention":
        if isinstance(attn, cls):
            attn.set_rotate_qk(rotate_qk)
            return attn
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "layer_idx") if not hasattr(attn, n)]
        if missing:
            raise TypeError(f"{type(attn).__name__} is not an HF decoder attention module: it lacks {missing}")
        return cls(attn, rotate_qk)

    def set_rotate_qk(self, rotate_qk: bool) -> None:
        if rotate_qk and not self.rotate_qk:
            from pq_ao.hadamard import hadamard_factor

            self.register_buffer("r3_had_k", hadamard_factor(self.head_dim)[1].float(), persistent=False)
        self.rotate_qk = rotate_qk

    # ---- prefix ---------------------------------------------------------------------------------------------
    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[2]

    def set_prefix(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Install the prefix KV, `[1, H_kv, P, D]` each (K post-RoPE, post-R3), as contiguous constant buffers.
        Contiguous: `pq_ao::kv_attention` reads them through strides fixed when a graph is traced, and nothing
        promises that an AOTI package keeps a constant's strides (V arrives as a transposed view)."""
        if k is None:
            self.prefix_k = self.prefix_v = None
            return
        if k.shape != v.shape or k.dim() != 4 or k.shape[0] != 1 or k.shape[1] != self.n_kv_heads:
            raise ValueError(f"prefix K/V must be [1, {self.n_kv_heads}, P, {self.head_dim}], got {k.shape}, {v.shape}")
        self.prefix_k = k.detach().clone(memory_format=torch.contiguous_format)
        self.prefix_v = v.detach().clone(memory_format=torch.contiguous_format)

    # ---- forward --------------------------------------------------------------------------------------------
    def _r3(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R3 on Q and K, `[B, H, T, D]` and `[B, H_kv, T, D]`, in one transform launch over their heads side by
        side (a transform per row of D: the same values as two launches; compiled, RoPE writes into the joined
        buffer). Joining them along the heads of `[B, T, H, D]` instead made the fused RoPE kernel slower on an
        H100 (86 against 66 us a layer at T = 2048, 2026-12-08)."""
        qk = torch.ops.pq_ao.hadamard_transform(torch.cat([q, k], dim=1), self.r3_had_k)
        return qk.split([q.shape[1], k.shape[1]], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values  # renamed in transformers 5.24 (hf_compat)
        bsz, q_len = hidden_states.shape[:2]
        hidden_shape = (bsz, q_len, -1, self.head_dim)
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(hidden_states)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if self.rotate_qk:
            q, k = self._r3(q, k)
        if self.qkv_probe._forward_hooks:  # only while calibration observes (no module call otherwise)
            self.qkv_probe(q, k, v)
        if isinstance(cache, QuantizedKVCache):
            return self.o_proj(self._attend_codes(q, k, v, cache, attention_mask)), None
        if self.k_quant is not None:
            k = self.k_quant(k)
        if self.v_quant is not None:
            v = self.v_quant(v)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = self._attend(q, k, v, attention_mask)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out), None

    def _attend_codes(self, q, k, v, cache: QuantizedKVCache, attention_mask):
        """Write the new tokens' codes into the int cache, then attend over prefix + cache: decode (one query)
        through `pq_ao::kv_attention`, which reads the codes directly; a prefill into an empty cache without padding
        (no mask, `holds_tokens` False) over the prefix and its own decoded codes, SDPA's causal kernels; any other
        prefill over the prefix and every decoded slot, masked. The slot mask comes from HF (over all
        `max_cache_len` slots) or, without one, is causal from the cache position. Returns the heads side by side,
        `[B, q_len, H * D]`."""
        q_len = q.shape[2]
        new_k, new_v = self.k_quant.codes(k), self.v_quant.codes(v)
        fresh = q_len > 1 and attention_mask is None and not cache.layers[self.layer_idx].holds_tokens
        k_codes, v_codes = cache.update(new_k, new_v, self.layer_idx)
        if fresh:  # no padding, nothing cached before: the new tokens see the prefix and each other, causally
            out = self._causal_with_prefix(q, self.k_quant.decode(new_k, q.dtype), self.v_quant.decode(new_v, q.dtype))
            return _merge_heads(out)
        slots = k_codes.shape[2]
        start = cache.layers[self.layer_idx].cumulative_length - q_len
        mask = _slot_mask(attention_mask, q.shape[0], q_len, slots, start, q.device)
        if q_len == 1:
            p = self.prefix_len
            pk = self.prefix_k if p else q.new_zeros(1, self.n_kv_heads, 0, self.head_dim)
            pv = self.prefix_v if p else pk
            out = torch.ops.pq_ao.kv_attention(q, k_codes, v_codes, self.k_quant.scale, self.v_quant.scale, pk, pv,
                                               mask, self.scaling, self.k_quant.bits)  # fmt: skip
            return _merge_heads(out)
        return _merge_heads(self._attend_slots(q, k_codes, v_codes, mask))

    def _attend_slots(self, q, k_codes, v_codes, mask):
        """Attention over the prefix and every cache slot (decoded), `mask` `[B, q_len, slots]` (True = visible)."""
        k_all, v_all = self.k_quant.decode(k_codes, q.dtype), self.v_quant.decode(v_codes, q.dtype)
        return self._attend(q, k_all, v_all, mask[:, None])

    def _causal_with_prefix(self, q, k, v):
        """Causal attention of q over its own k/v (same length) with the prefix visible to every query, through SDPA's
        square causal mask (flash kernels): the P prefix keys go in front of k, and P zero queries in front of q,
        whose outputs are dropped. Query i then sits at row P + i and sees keys 0 .. P + i: the prefix and k[:i+1]."""
        bsz, _, q_len, d = q.shape
        p = self.prefix_len
        if p:
            k = torch.cat([self.prefix_k.to(k.dtype).expand(bsz, -1, -1, -1), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).expand(bsz, -1, -1, -1), v], dim=2)
            q = torch.cat([q.new_zeros(bsz, q.shape[1], p, d), q], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return out[:, :, p:]

    def _attend(self, q, k, v, attention_mask):
        """softmax(Q [K_prefix; K]^T * scaling) [V_prefix; V] with the prefix visible to every query. Compiled on
        CUDA, a masked prefill goes through FlexAttention (`flex_prefix`); otherwise SDPA with the mask widened by
        the prefix columns."""
        bsz, _, q_len, _ = q.shape
        kv_len = k.shape[2]
        if attention_mask is None and q_len == kv_len and q_len > 1:
            return self._causal_with_prefix(q, k, v)
        p = self.prefix_len
        if p:
            k = torch.cat([self.prefix_k.to(k.dtype).expand(bsz, -1, -1, -1), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).expand(bsz, -1, -1, -1), v], dim=2)
        keep = _keep_mask(attention_mask, q_len, kv_len, q.device) if q_len > 1 and flex_prefix.usable(q) else None
        if keep is not None:
            return flex_prefix.prefix_flex_attention(q, k, v, keep, p, self.scaling)
        mask = _extend_mask(attention_mask, q_len, kv_len, p, q.device)
        is_causal = mask is None and q_len > 1
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, rotate_qk={self.rotate_qk}, prefix={self.prefix_len}"


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, D]` -> `[B, T, H * D]`."""
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def _causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool `[q_len, kv_len]`: the queries are the last `q_len` of the `kv_len` keys, each seeing itself and earlier."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def _keep_mask(mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The HF mask over the cache as bool `[B, q_len, kv_len]` (True = visible; None = causal), or None when it is
    not a visibility mask shared by the heads (an additive float mask, a per-head mask)."""
    if mask is None:
        return _causal(q_len, kv_len, device)[None]
    if mask.dtype != torch.bool or mask.dim() not in (3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        return None
    keep = mask[:, 0] if mask.dim() == 4 else mask
    return keep[..., :kv_len]


def _extend_mask(mask, q_len: int, kv_len: int, prefix_len: int, device) -> torch.Tensor | None:
    """The HF mask over the cache (None = causal, bool = keep, float = additive), widened by `prefix_len` visible
    columns on the left. Returns None when plain causal attention without a prefix suffices."""
    if mask is None:
        if prefix_len == 0 and (q_len == kv_len or q_len == 1):
            return None  # SDPA's is_causal (or a single query seeing everything) is exact here
        mask = _causal(q_len, kv_len, device)[None, None]
    mask = mask[..., :kv_len]
    if prefix_len == 0:
        return mask
    if mask.dtype == torch.bool:
        cols = torch.ones(*mask.shape[:-1], prefix_len, dtype=torch.bool, device=mask.device)
    else:
        cols = torch.zeros(*mask.shape[:-1], prefix_len, dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)


def _slot_mask(mask, bsz: int, q_len: int, slots: int, start: torch.Tensor, device) -> torch.Tensor:
    """Bool `[B, q_len, slots]` (True = visible) from an HF mask over the static slots (bool, or additive float
    where 0 = visible); without one, causal from `start`, the slot of the first query."""
    if mask is None:
        pos = start + torch.arange(q_len, device=device)
        keep = torch.arange(slots, device=device)[None, :] <= pos[:, None]
        return keep[None].expand(bsz, -1, -1)
    keep = mask if mask.dtype == torch.bool else mask == 0
    return keep[:, 0, :, :slots].expand(bsz, -1, -1)


class PrefixPositions(nn.Module):
    """Wraps a model's rotary-embedding module so real tokens get positions `offset + position_ids`."""

    def __init__(self, rotary: nn.Module, offset: int):
        super().__init__()
        self.rotary = rotary
        self.offset = offset

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary(x, position_ids + self.offset)

    def extra_repr(self) -> str:
        return f"offset={self.offset}"
