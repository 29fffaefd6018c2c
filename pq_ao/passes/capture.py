"""Capture a decoder block as a `torch.export` graph, and the model-level tensors around the blocks.

`trace_model` runs the model once on a few tokens with hooks: it records the call of the first decoder block (its
exact args/kwargs: hidden_states, position_embeddings from the model's own rotary module, mask, ...) and the
input/output of every module outside the blocks. `capture_block` exports block 0 on those args with
`torch.export.export(strict=False)`; the passes read that graph (`structure.py`).

The blocks are found structurally: the `nn.ModuleList` of same-typed children holding linears with the most
parameters. Attention runs as SDPA (or eager) while capturing, the two implementations export handles.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from pq_ao.hf_compat import CACHE_KWARGS

_CAPTURABLE_ATTENTION = ("sdpa", "eager")


class StructureError(ValueError):
    """The model's graph does not have the structure a pass needs; the message names what was not found."""


@dataclass
class ModelTrace:
    """What one forward of the model showed: block 0's call and the tensors around the blocks."""

    blocks: str  # qualified name of the ModuleList of decoder blocks
    block_args: tuple
    block_kwargs: dict
    block_input: torch.Tensor  # hidden states entering block 0
    block_output: torch.Tensor  # hidden states leaving the last block
    io: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict
    )  # outside blocks


def find_blocks(model: nn.Module) -> str:
    """Qualified name of the decoder blocks: the ModuleList of same-typed children containing nn.Linear with the
    most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise StructureError(
            f"{type(model).__name__}: no nn.ModuleList of repeated decoder blocks (same-typed children with linears)"
        )
    return best


@contextlib.contextmanager
def capturable_attention(model: nn.Module):
    """Run attention as SDPA while capturing unless it already is SDPA or eager (flash/flex kernels do not
    export on CPU); the config is restored afterwards."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is None or impl in _CAPTURABLE_ATTENTION:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = impl


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in map(_first_tensor, x) if t is not None), None)
    if hasattr(x, "to_tuple"):  # HF ModelOutput
        return _first_tensor(x.to_tuple())
    return None


def example_input_ids(model: nn.Module, n_tokens: int = 6) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32
    device = next(model.parameters()).device
    return (torch.arange(1, n_tokens + 1, device=device) * 7 % vocab)[None]


@torch.no_grad()
def trace_model(model: nn.Module, input_ids: torch.Tensor | None = None) -> ModelTrace:
    """One forward of `model` (no cache) recording block 0's call and the io of every module outside the blocks."""
    blocks_name = find_blocks(model)
    blocks = model.get_submodule(blocks_name)
    input_ids = example_input_ids(model) if input_ids is None else input_ids
    rec: dict = {"io": {}}
    inside = {id(m) for b in blocks for m in b.modules()}

    def block0_pre(mod, args, kwargs):
        rec["args"], rec["kwargs"] = args, kwargs
        rec["input"] = _first_tensor((args, kwargs.get("hidden_states")))

    def last_block(mod, args, kwargs, out):
        rec["output"] = _first_tensor(out)

    def outside(name):
        def hook(mod, args, kwargs, out):
            rec["io"].setdefault(name, (_first_tensor((args, list(kwargs.values()))), _first_tensor(out)))

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(block0_pre, with_kwargs=True),
        blocks[-1].register_forward_hook(last_block, with_kwargs=True),
    ]
    for name, mod in model.named_modules():
        if name and id(mod) not in inside and mod is not blocks:
            handles.append(mod.register_forward_hook(outside(name), with_kwargs=True))
    try:
        with capturable_attention(model):
            model(input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if "args" not in rec or rec["input"] is None:
        raise StructureError(
            f"the forward of {type(model).__name__} never called {blocks_name}[0] with a tensor"
        )
    return ModelTrace(blocks_name, rec["args"], rec["kwargs"], rec["input"], rec["output"], rec["io"])


def capture_module(
    module: nn.Module, args: tuple, kwargs: dict | None = None
) -> torch.export.ExportedProgram:
    """`torch.export.export(strict=False)` with a StructureError naming the module when export fails."""
    try:
        return torch.export.export(module, tuple(args), kwargs or {}, strict=False)
    except Exception as e:  # noqa: BLE001 - any export failure becomes a structure error with context
        raise StructureError(
            f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {e}"
        ) from e


_CACHE_KWARGS = (*CACHE_KWARGS, "past_key_value", "use_cache", "cache_position", "output_attentions")


def capture_block(model: nn.Module, trace: ModelTrace | None = None) -> torch.export.ExportedProgram:
    """Export decoder block 0 on the args the model itself passed it (no KV cache)."""
    trace = trace or trace_model(model)
    block = model.get_submodule(trace.blocks)[0]
    kwargs = {k: v for k, v in trace.block_kwargs.items() if k not in _CACHE_KWARGS}
    with capturable_attention(model):
        return capture_module(block, trace.block_args, kwargs)
