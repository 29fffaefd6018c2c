"""GPTQ (Frantar et al., 2022): per-channel weight quantization that feeds each column's rounding error forward into
the columns not yet quantized, through the inverse Hessian of the layer-output error.

For a linear y = x W^T with calibration inputs X `[T, K]` (here: the quantized model's inputs to the block, the
prefix KV installed, after the online Hadamard for down_proj), H = X^T X; quantizing W row-wise to Q minimises
||X (W - Q)^T||^2 one column at a time: column j is rounded to the grid, and its error, scaled by the Cholesky
factor of H^-1, is subtracted from the columns j+1.. (in blocks of `block_size` columns, the lazy batch updates of
the paper). The grid is fixed beforehand: the per-output-channel symmetric scale of `quant_math` (min-max, times
the clip factors of the weight search when the grid search runs). `act_order` quantizes the columns in order of
decreasing diag H (the inputs with the most energy first, so their errors are fed into the most columns; the
paper's "act-order", QuaRot's default): with one scale per output channel the grid does not depend on the column
order, and the codes are put back in the natural order. Damping: `damp * mean(diag H)` on the diagonal; columns no
input touches (diag H = 0) are set to 0.

Invariant: the codes returned lie on the grid of the given scale (`quant_math.quantize(w, scale)` of the returned
dequantized weight, and of the returned compensated weights, gives them back exactly), and for the same H the
output error is at most RTN's up to the damping (`tests/calibration/test_gptq.py` checks it is below on correlated
inputs).
"""

from __future__ import annotations

import torch

from pq_ao import quant_math


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, bits: int, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ codes of `w` `[N, K]` (int8, values on the `bits` grid) for per-row scales `scale` `[N]` (or `[N, 1]`),
    given `gram` = X^T X `[K, K]`; `act_order`: columns by decreasing diag H. Computed in float64 (a few K x K
    factorizations: cheap next to the block passes).

    Also returns the compensated weights `[N, K]` fp32: each column as it stood when it was rounded (the earlier
    columns' errors fed in), which round to the codes exactly and keep how far each sat from a rounding boundary
    (where fine-tuning starts: `finetune.py`)."""
    if w.dim() != 2 or gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"w must be [N, K] and gram [K, K]; got {list(w.shape)}, {list(gram.shape)}")
    if not 0 <= damp < 1 or block_size < 1:
        raise ValueError(f"damp must be in [0, 1) and block_size >= 1, got {damp}, {block_size}")
    n, k = w.shape
    s = scale.reshape(n, 1).to(torch.float32)
    W = w.detach().to(torch.float64).clone()
    H = gram.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky factor of H^-1
    Q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    compensated = torch.empty(n, k, dtype=torch.float32, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            compensated[:, i1 + i] = col.to(torch.float32)
            q = quant_math.quantize(compensated[:, i1 + i].unsqueeze(1), s, bits).squeeze(1)  # the contract's rounding
            Q[:, i1 + i] = q
            err = (col - q.to(torch.float64) * s[:, 0].to(torch.float64)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm)
        Q, compensated = Q[:, inv], compensated[:, inv]
    return Q, compensated
