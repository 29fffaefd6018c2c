"""Rotations R1-R4 (QuaRot / SpinQuant naming), fused into weights or inserted online.

Invariant: in exact arithmetic the rotated model computes the same logits as the original (tested to < 1e-4
relative in fp32), with or without a KV cache.

- R1 = diag(s) H_d / sqrt(d), a random Hadamard of the hidden size (seed `seed`), on the residual stream:
  embedding `E <- E R1`; readers of a norm (q/k/v, gate/up) and lm_head `W <- W R1`; residual writers
  (o_proj, down_proj) `W <- R1^T W`, `b <- b R1`. Exact because norms are folded first (weight ones), and
  x / rms(x) commutes with an orthogonal R1.
- R2, a random Hadamard of head_dim (seed `seed + 1`), one matrix for every head of every layer: each KV head's
  rows of v_proj `W_v^h <- R2^T W_v^h` (and bias), each head's columns of o_proj `W_o^h <- W_o^h R2`. Attention
  mixes V over tokens only, so head h's output is rotated by R2 and o_proj undoes it; under GQA every query head
  reads its KV head's V, rotated by the same R2.
- R3, the head_dim Hadamard on Q and K after RoPE, online in `PrefixAttention` (`rotate_qk`): Q K^T unchanged.
- R4, the intermediate-size Hadamard on down_proj's input: online in `HadamardLinear`, its inverse fused into
  the weight `W <- W H^T`.

Weights are transformed in float32 (float64 ones in float64) and cast back. The seeds and sizes are recorded in the
model's state (`pq_ao.state`, `rotation`).
"""

from __future__ import annotations

import torch
from torch import nn

from pq_ao.hadamard import RandomHadamard, compute_dtype, hadamard_factor
from pq_ao.nn import masks
from pq_ao.nn.attention import PrefixAttention
from pq_ao.nn.hadamard_linear import HadamardLinear
from pq_ao.passes.fold_norms import norms_folded
from pq_ao.passes.structure import ModelStructure, find_structure
from pq_ao.state import require_state


def _update(param: torch.Tensor | None, fn) -> None:
    """param <- fn(param in its compute dtype), cast back to its dtype."""
    if param is not None:
        param.copy_(fn(param.detach().to(compute_dtype(param.dtype))).to(param.dtype))


def _rotate_input(lin: nn.Module, r: RandomHadamard) -> None:
    """W <- W R (the layer reads x R)."""
    _update(lin.weight, r.right)


def _rotate_output(lin: nn.Linear, r: RandomHadamard) -> None:
    """W <- R^T W, b <- b R (the layer writes y R)."""
    _update(lin.weight, lambda w: r.right(w.T).T)
    _update(lin.bias, r.right)


def _rotate_heads_output(lin: nn.Linear, r: RandomHadamard, head_dim: int) -> None:
    """Each head's output block of W (rows h*hd:(h+1)*hd) and bias: y_h <- y_h R."""
    out, inp = lin.weight.shape
    _update(
        lin.weight,
        lambda w: r.right(w.view(-1, head_dim, inp).transpose(1, 2)).transpose(1, 2).reshape(out, inp),
    )
    _update(lin.bias, lambda b: r.right(b.view(-1, head_dim)).reshape(-1))


def _rotate_heads_input(lin: nn.Linear, r: RandomHadamard, head_dim: int) -> None:
    """Each head's input block of W (columns h*hd:(h+1)*hd): the layer reads x_h R."""
    out, inp = lin.weight.shape
    _update(lin.weight, lambda w: r.right(w.view(out, -1, head_dim)).reshape(out, inp))


def attach_attention(
    model: nn.Module, structure: ModelStructure | None = None, rotate_qk: bool = False
) -> ModelStructure:
    """Swap every block's attention module for `PrefixAttention.wrap(attn, rotate_qk)` (R3 when rotate_qk), and
    have HF build the masks `PrefixAttention` reads (`masks.use_prefix_masks`)."""
    s = structure or find_structure(model)
    for b in s.blocks:
        name = f"{b.block}.{b.attn}"
        model.set_submodule(name, PrefixAttention.wrap(model.get_submodule(name), rotate_qk=rotate_qk))
    masks.use_prefix_masks(model)
    return s


@torch.no_grad()
def rotate_model(
    model: nn.Module,
    structure: ModelStructure | None = None,
    *,
    seed: int = 0,
    online_r3: bool = True,
    online_r4: bool = True,
) -> ModelStructure:
    """Fuse R1/R2, swap down_proj for `HadamardLinear` (R4) and attention for `PrefixAttention` (R3 when
    `online_r3`). In place; returns the structure. The norms must be folded first (`fold_norms`): R1 commutes with
    x / rms(x) only when the norm's weight is ones."""
    state = require_state(model)
    if state.rotation:
        raise ValueError(f"model is already rotated: {state.rotation}")
    s = structure or find_structure(model)
    if not norms_folded(model, s):
        raise ValueError("fold the norms first (pq_ao.passes.fold_norms): the rotation is exact only then")
    b0 = s.block
    r1 = RandomHadamard.from_seed(s.hidden_size, seed)
    r2 = RandomHadamard.from_seed(b0.head_dim, seed + 1)

    _rotate_input(model.get_submodule(s.embed), r1)
    _rotate_input(model.get_submodule(s.lm_head), r1)
    for i, b in enumerate(s.blocks):
        for name in (*b.qkv, *b.mlp_inputs):
            _rotate_input(s.get(model, i, name), r1)
        for name in b.residual_writers:
            _rotate_output(s.get(model, i, name), r1)
        _rotate_heads_output(s.get(model, i, b.v_proj), r2, b.head_dim)
        _rotate_heads_input(s.get(model, i, b.o_proj), r2, b.head_dim)
        if online_r4:
            name = f"{b.block}.{b.down_proj}"
            model.set_submodule(name, HadamardLinear.from_linear(model.get_submodule(name)))
    attach_attention(model, s, rotate_qk=online_r3)

    down = s.get(model, 0, b0.down_proj)
    state.rotation = {
        "seed": seed,
        "r1": {"size": s.hidden_size, "K": hadamard_factor(s.hidden_size)[0], "seed": seed},
        "r2": {"size": b0.head_dim, "K": hadamard_factor(b0.head_dim)[0], "seed": seed + 1},
        "r3": {"size": b0.head_dim, "online": online_r3},
        "r4": {"size": down.in_features, "K": hadamard_factor(down.in_features)[0], "online": online_r4},
    }
    return s
