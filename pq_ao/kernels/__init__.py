"""Kernels: plain-torch references (`reference`) and Triton kernels (`triton`), registered as `pq_ao::` ops by
`ops` (imported here, so `import pq_ao.kernels` makes `torch.ops.pq_ao.*` available)."""

from pq_ao.kernels import ops, reference


def enable_compile_memo() -> list[str]:
    """Memoize inductor's mutation analysis of our Triton kernels where that helps (`pq_ao.kernels.triton.
    mutation_memo.enable`); called where a model with our ops is built, loaded or exported. Returns the names of
    torch's functions wrapped (none without triton, or when switched off)."""
    try:
        from pq_ao.kernels.triton import mutation_memo
    except ImportError:  # no triton: nothing of ours to compile
        return []
    return mutation_memo.enable()


__all__ = ["enable_compile_memo", "ops", "reference"]
