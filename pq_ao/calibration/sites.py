"""The quantization sites of one pre-norm decoder block, as the structure pass found them.

A site is a group of linears reading one tensor (q/k/v read the attention norm's output; gate/up the MLP norm's),
so they share one activation quantizer. The block computes `h = x + attn(norm1(x)); out = h + mlp(norm2(h))`
(the structure pass checks that o_proj and down_proj are the only residual writers), which lets the grid search
recompute only the part of a block downstream of the site it is tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pq_ao.nn.attention import PrefixAttention

SITES = ("qkv", "o", "gate_up", "down")


@dataclass
class BlockSites:
    index: int
    block: nn.Module
    attn_norm: nn.Module
    attn: PrefixAttention
    mlp_norm: nn.Module
    mlp: nn.Module
    qkv: list[nn.Linear]
    o: nn.Linear
    gate_up: list[nn.Linear]
    down: nn.Linear

    def linears(self, site: str) -> list[nn.Linear]:
        value = getattr(self, site)
        return value if isinstance(value, list) else [value]

    def all_linears(self) -> list[tuple[str, nn.Linear]]:
        return [(site, lin) for site in SITES for lin in self.linears(site)]


def block_sites(model: nn.Module, structure) -> list[BlockSites]:
    """Resolve the structure pass's module names into the modules of every block."""
    out = []
    for i, bs in enumerate(structure.blocks):
        block = model.get_submodule(bs.block)
        get = block.get_submodule
        attn = get(bs.attn)
        if not isinstance(attn, PrefixAttention):
            raise TypeError(f"block {i}: attention {bs.attn} was not swapped for PrefixAttention (run rotate first)")
        out.append(
            BlockSites(
                index=i,
                block=block,
                attn_norm=get(bs.attn_norm),
                attn=attn,
                mlp_norm=get(bs.mlp_norm),
                mlp=get(bs.mlp),
                qkv=[get(n) for n in bs.qkv],
                o=get(bs.o_proj),
                gate_up=[get(n) for n in bs.mlp_inputs],
                down=get(bs.down_proj),
            )
        )
    return out
