"""Model transforms of a decoder: capture a block, find its structure, fold norms, fuse and insert rotations, install
the prefix (and, in `convert`, turn calibrated linears into `IntxLinearWeight`s)."""

from pq_ao.passes.capture import StructureError, capture_block, find_blocks, trace_model
from pq_ao.passes.fold_norms import fold_norms, untie_embeddings
from pq_ao.passes.fuse import fuse_projections, unfuse_projections, unfused
from pq_ao.passes.prefix import attach_prefix_positions, install_prefix, remove_prefix
from pq_ao.passes.rotate import attach_attention, rotate_model
from pq_ao.passes.structure import (
    BlockStructure,
    ModelStructure,
    check_attention,
    check_supported,
    find_structure,
)

__all__ = [
    "BlockStructure",
    "ModelStructure",
    "StructureError",
    "attach_attention",
    "attach_prefix_positions",
    "check_attention",
    "check_supported",
    "install_prefix",
    "remove_prefix",
    "capture_block",
    "find_blocks",
    "find_structure",
    "fold_norms",
    "fuse_projections",
    "unfuse_projections",
    "unfused",
    "rotate_model",
    "trace_model",
    "untie_embeddings",
]
