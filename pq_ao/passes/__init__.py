"""Graph passes over a decoder: capture a block, find its structure, fold norms, fuse and insert rotations."""

from pq_ao.passes.capture import StructureError, capture_block, find_blocks, trace_model
from pq_ao.passes.fold_norms import fold_norms, untie_embeddings
from pq_ao.passes.rotate import attach_attention, rotate_model
from pq_ao.passes.structure import BlockStructure, ModelStructure, find_structure

__all__ = [
    "BlockStructure",
    "ModelStructure",
    "StructureError",
    "attach_attention",
    "capture_block",
    "find_blocks",
    "find_structure",
    "fold_norms",
    "rotate_model",
    "trace_model",
    "untie_embeddings",
]
