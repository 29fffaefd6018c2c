"""Kernels: plain-torch references (`reference`) and Triton kernels (`triton`), registered as `pq_ao::` ops by
`ops` (imported here, so `import pq_ao.kernels` makes `torch.ops.pq_ao.*` available)."""

from pq_ao.kernels import ops, reference

__all__ = ["ops", "reference"]
