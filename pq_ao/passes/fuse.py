"""Fuse: the quantized linears that read one input become one (`pq_ao.nn.fused_linear`).

- Each `PrefixAttention`'s q/k/v_proj -> `qkv_proj`, a `FusedLinear` (the attention calls it when present).
- Each gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`, computing `down(act(gate(x)) * up(x))`) ->
  a `FusedGatedMLP` whose `gate_up_proj` is a `FusedLinear`.

Invariant: each fused linear's outputs are bitwise those of the separate linears (one quantized input, the same
integer dot products and epilogue per output channel), so the model computes what it computed before (elementwise
ops after the split may round in the last bit where eager kernels vectorise strided views differently). A site whose linears quantize their input differently, or an
MLP that does not compute the gated form on a probe input, stays as it is. `unfuse_projections` (or the `unfused`
context) gives back the original modules, with weights that are views of the fused ones: what code that walks
q_proj or gate_proj (saving, reports) needs. `quantize_` fuses at its end (`PrefixQuantConfig.fuse_projections`),
`load_quantized` after loading.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from pq_ao.nn.attention import PrefixAttention
from pq_ao.nn.fused_linear import FusedGatedMLP, FusedLinear, fusable

__all__ = ["fuse_projections", "unfuse_projections", "unfused"]

log = logging.getLogger(__name__)

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _is_gated_mlp(module: nn.Module) -> bool:
    return (not isinstance(module, FusedGatedMLP) and hasattr(module, "act_fn")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in (*GATE_UP, "down_proj")))  # fmt: skip


@torch.no_grad()
def _computes_gated_form(mlp: nn.Module, fused: FusedGatedMLP) -> bool:
    """The MLP's own forward against the fused form on a random probe (a model whose MLP wires gate/up otherwise,
    or adds anything, differs by far more than rounding)."""
    w = mlp.gate_proj.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, mlp.gate_proj.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
    want, got = mlp(x), fused(x)
    return want.shape == got.shape and bool((got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-6)


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse q/k/v and gate/up wherever they share their input quantization (see the module docstring); returns the
    names of the modules fused (`<attention>.qkv_proj`, `<mlp>.gate_up_proj`)."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, PrefixAttention) and module.qkv_proj is None:
            linears = [getattr(module, n) for n in QKV]
            reason = fusable(linears)
            if reason is not None:
                log.debug("%s: q/k/v stay separate: %s", name, reason)
                continue
            module.qkv_proj = FusedLinear.from_linears(linears, list(QKV))
            for n in QKV:
                delattr(module, n)
            done.append(f"{name}.qkv_proj")
        elif _is_gated_mlp(module):
            linears = [getattr(module, n) for n in GATE_UP]
            reason = fusable(linears)
            if reason is not None:
                log.debug("%s: gate/up stay separate: %s", name, reason)
                continue
            fused = FusedGatedMLP(module, FusedLinear.from_linears(linears, list(GATE_UP)))
            if not _computes_gated_form(module, fused):
                log.debug("%s: gate/up stay separate: the MLP does not compute down(act(gate(x)) * up(x))", name)
                continue
            for n in GATE_UP:
                delattr(module, n)
            model.set_submodule(name, fused)
            done.append(f"{name}.gate_up_proj")
    return done


def unfuse_projections(model: nn.Module) -> None:
    """Give back the separate linears (weights and biases as views of the fused ones)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PrefixAttention) and module.qkv_proj is not None:
            for n, lin in zip(module.qkv_proj.names, module.qkv_proj.unfuse()):
                setattr(module, n, lin)
            module.qkv_proj = None
        elif isinstance(module, FusedGatedMLP):
            model.set_submodule(name, module.unfuse())


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model has its separate linears (views of the fused weights); fused again afterwards."""
    fused = [n for n, m in model.named_modules()
             if isinstance(m, FusedGatedMLP) or (isinstance(m, PrefixAttention) and m.qkv_proj is not None)]  # fmt: skip
    if not fused:
        yield model
        return
    unfuse_projections(model)
    try:
        yield model
    finally:
        fuse_projections(model)
