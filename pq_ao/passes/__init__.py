"""Graph passes over a decoder: capture a block, find its structure, fold norms, fuse and insert rotations."""

from pq_ao.passes.capture import StructureError, capture_block, find_blocks, trace_model
from pq_ao.passes.structure import BlockStructure, ModelStructure, discover

__all__ = [
    "BlockStructure",
    "ModelStructure",
    "StructureError",
    "capture_block",
    "discover",
    "find_blocks",
    "trace_model",
]
