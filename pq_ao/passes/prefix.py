"""The prefix pass: build the prefix KV and install it, so that every sequence attends to the prefix and starts at
position P (the rotary module wrapped in `PrefixPositions`; a forward pre-hook that gives each row of a padded batch
the positions it has alone, from the attention mask; a BOS guard on the model's input).

Invariant: for input x, the prefixed model's logits equal the un-prefixed model's logits on `prefix + x` at the
positions of x (in full precision), and the prefix KV is never quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from pq_ao.hf_compat import cache_in
from pq_ao.nn.attention import PrefixAttention, PrefixPositions, full_precision_kv, observe_qkv
from pq_ao.passes.structure import decoder
from pq_ao.state import require_state


def rotary_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) of the model-level rotary embedding that produces `position_embeddings`."""
    base = decoder(model)
    for name, child in base.named_children():
        if "rotary" in name:
            return base, name
    raise ValueError(
        f"{type(base).__name__} has no model-level rotary embedding module (no child named '*rotary*'): "
        "PrefixQuant needs position_embeddings computed once per forward to offset real tokens past the prefix"
    )


@torch.no_grad()
def build_prefix_kv(model: nn.Module, attns: list[PrefixAttention], prefix_ids: list[int]):
    """Run the (rotated, full-precision) model over the prefix at positions 0..P-1; return per-layer (K, V)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(attn, q, k, v):
        captured[id(attn)] = (k.detach().clone(), v.detach().clone())

    device = next(model.parameters()).device
    with full_precision_kv(attns), observe_qkv(attns, keep):
        decoder(model)(input_ids=torch.tensor([prefix_ids], device=device), use_cache=False)
    return [captured[id(a)] for a in attns]


def install_prefix(model: nn.Module, attns: list[PrefixAttention], prefix_ids: list[int]) -> None:
    """Compute the prefix KV, store it in every attention module and shift real tokens to positions P.."""
    if not prefix_ids:
        raise ValueError("empty prefix")
    remove_prefix(model, attns)
    kv = build_prefix_kv(model, attns, prefix_ids)
    for a, (k, v) in zip(attns, kv):
        a.set_prefix(k, v)
    attach_prefix_positions(model, prefix_ids)


def attach_prefix_positions(model: nn.Module, prefix_ids: list[int]) -> None:
    """Real tokens start at position len(prefix), each row of a padded batch at its first real token; inputs
    starting with the prefix's BOS are rejected."""
    owner, name = rotary_owner(model)
    setattr(owner, name, PrefixPositions(getattr(owner, name), len(prefix_ids)))
    state = require_state(model)
    state.prefix_ids = list(prefix_ids)
    state.hooks = [model.register_forward_pre_hook(_positions_from_mask, with_kwargs=True),
                   model.register_forward_pre_hook(_bos_guard(prefix_ids[-1]), with_kwargs=True)]  # fmt: skip


def _positions_from_mask(_module, args, kwargs):
    """Forward pre-hook: without `position_ids`, HF numbers the tokens of every row 0..T-1 whatever its padding; a
    full-precision model does not mind (RoPE sees only differences), but the prefix sits at absolute positions
    0..P-1, so left padding would open a gap between it and the text. From a 2-D attention mask (over past + new
    tokens, as HF takes it) each row's tokens get `cumsum(mask) - 1`: the positions it has alone. Unpadded rows get
    0..T-1 as before; `generate` passes its own position_ids (the same numbers), which are kept. No data-dependent
    branch: the same ops run eager, compiled and exported."""
    if kwargs.get("position_ids") is not None or len(args) > 2:
        return None
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None or mask.dim() != 2:
        return None
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return None
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -x.shape[1]:]
    return args, {**kwargs, "position_ids": positions}


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting()


def _bos_guard(separator_id: int):
    """Forward pre-hook: the prefix already ends with BOS; a second one at the start of the input would become a
    massive-activation outlier again and break the static scales (PrefixQuant issue #16). Rejected, not stripped, so
    logits always align with the caller's tokens."""

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = cache_in(kwargs)
        if ids is None or _tracing() or (past is not None and past.get_seq_length() > 0):
            return None
        first = ids.gather(1, _first_real_token(kwargs.get("attention_mask"), ids)).squeeze(1)
        if bool((first == separator_id).any()):
            raise ValueError(
                f"input starts with token {separator_id} (BOS / separator), which the PrefixQuant prefix already "
                "ends with: tokenize with add_special_tokens=False (or drop the leading BOS)"
            )
        return None

    return hook


def _first_real_token(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Index `[B, 1]` of each row's first non-padding token. `mask`: None, HF's 2-D padding mask, or a 4-D
    `[B, 1, T, S]` mask (bool, or additive with 0 = visible; generate passes one with a static cache) whose last
    query row shows every real token of its row."""
    if mask is None:
        return torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    if mask.dim() == 4:
        last = mask[:, 0, -1, : ids.shape[1]]
        mask = last if last.dtype == torch.bool else last == 0
    return mask.long().argmax(-1, keepdim=True)


def remove_prefix(model: nn.Module, attns: list[PrefixAttention]) -> None:
    state = require_state(model)
    for hook in state.hooks:
        hook.remove()
    state.hooks = []
    for a in attns:
        a.set_prefix(None, None)
    owner, name = rotary_owner(model)
    rotary = getattr(owner, name)
    if isinstance(rotary, PrefixPositions):
        setattr(owner, name, rotary.rotary)
    state.prefix_ids = []
