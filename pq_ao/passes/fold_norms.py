"""Fold every RMSNorm weight into the linears reading the norm's output.

Invariant: the model computes the same function; afterwards every norm's weight is ones, so each norm is a pure
x / rms(x), which commutes with any orthogonal rotation of the residual stream (what `rotate.py` needs).

- `W <- W diag(g)` for each reader (RMSNorm(x) = g * x / rms(x), so W RMSNorm(x) = (W diag(g)) x / rms(x)).
- The final norm folds into lm_head. A tied lm_head is untied first (its own Parameter, `tie_word_embeddings`
  off in the config and in HF's tying map), or folding would rescale the embedding too.
- Per-head q_norm/k_norm (Qwen3) act on q_proj/k_proj outputs inside the head: they are not on the residual
  stream, R1 never reaches them, and they are left as they are.
- Embeddings are not mean-centred (QuaRot does it; it is not exact for RMSNorm models).

Arithmetic in float32 (float64 for float64 weights), cast back to each weight's dtype. Idempotent.
"""

from __future__ import annotations

import torch
from torch import nn

from pq_ao.hadamard import compute_dtype
from pq_ao.passes.structure import ModelStructure, find_structure


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """W <- W diag(g) for each reader, then g <- 1."""
    g = getattr(norm, "weight", None)
    if g is None:
        return
    for lin in readers:
        w = lin.weight
        dt = compute_dtype(w.dtype, g.dtype)
        w.copy_((w.to(dt) * g.detach().to(device=w.device, dtype=dt)).to(w.dtype))
    g.fill_(1.0)


@torch.no_grad()
def untie_embeddings(model: nn.Module, s: ModelStructure) -> bool:
    """Give lm_head its own weight if it shares the embedding's; returns whether it was tied."""
    embed, head = model.get_submodule(s.embed), model.get_submodule(s.lm_head)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        for cfg in (config, _text_config(config)):
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    mapping = getattr(
        model, "all_tied_weights_keys", None
    )  # HF 5.x: what tie_weights(recompute_mapping=False) ties
    if isinstance(mapping, dict):
        names = {f"{s.lm_head}.weight", f"{s.embed}.weight"}
        for key in [k for k, v in mapping.items() if k in names or v in names]:
            del mapping[key]
    return tied


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def norms_folded(model: nn.Module, s: ModelStructure) -> bool:
    """Whether every norm that `fold_norms` folds has a weight of ones (or none)."""
    norms = [s.get(model, i, n) for i in range(s.n_blocks) for n in s.block.norm_readers]
    norms.append(model.get_submodule(s.final_norm))
    return all(getattr(m, "weight", None) is None or bool((m.weight == 1).all()) for m in norms)


def fold_norms(model: nn.Module, structure: ModelStructure | None = None) -> ModelStructure:
    """Untie lm_head, fold every block norm into its readers and the final norm into lm_head (in place)."""
    s = structure or find_structure(model)
    untie_embeddings(model, s)
    for i in range(s.n_blocks):
        for norm, readers in s.block.norm_readers.items():
            fold_norm(s.get(model, i, norm), [s.get(model, i, r) for r in readers])
    fold_norm(model.get_submodule(s.final_norm), [model.get_submodule(s.lm_head)])
    return s
