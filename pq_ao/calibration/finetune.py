"""Block-wise fine-tuning (EfficientQAT's Block-AP, as PrefixQuant uses it): after a block's grid search and
conversion, train its weights and every quantizer scale so the quantized block reproduces the full-precision block.

For block i, with X its inputs (the fine-tuning token stream through the already quantized and fine-tuned blocks
0..i-1, the prefix KV installed) and Y = the full-precision block on X: swap each converted linear for a
`TrainableQuantLinear` (its starting weight, the calibrated per-channel weight scales, the site's activation
scale or dynamic clip, the online Hadamard), make the static K/V scales trainable, and minimise MSE(block(X), Y) with
AdamW (weights at `ft_lr_weight`, scales at `ft_lr_scale` or frozen at 0, no weight decay), a cosine schedule to
a tenth of each rate, straight-through rounding (gradients to the values and, LSQ-style, to the scales). Then the block is converted
again from the trained values: the evaluated and deployed model runs the integer kernels, as before.

The starting weight is the full-precision one (EfficientQAT), or with GPTQ its compensated weights: each column as
GPTQ rounded it, the earlier columns' errors fed in (`gptq_quantize`). They round to GPTQ's codes, so training starts
from the converted block; the full-precision weight would throw GPTQ's compensation away (the first step's
straight-through rounding is plain round-to-nearest) and "kept" would compare against a block that is not the one
converted. GPTQ's rounded values would start there too, but each sits at the centre of its rounding cell, half a
step from any boundary, where small updates never change the forward. With GPTQ the per-channel weight scales do not
train (the activation and K/V scales do): GPTQ's codes and compensation hold for the grid it rounded on, and AdamW
moves a ~0.02 scale by about its learning rate a step. CPU, SmolLM2, 16 windows (benchmarks/RESULTS.md,
2026-12-07): static + GPTQ 45.31; + fine-tuning with every scale trained 45.31 (no block improved); with the weight
scales kept 43.14.

Invariants: training starts where conversion left the block (the trainable block's loss before the first step is
the converted block's, up to float rounding); only one block's parameters require gradients at a time (memory: one block plus the cached streams);
`fine_tune_block` leaves the block's modules as it found them (the converted linears, re-quantized), so the rest
of the pipeline sees no difference but the numbers; a block whose loss did not go down keeps its calibrated values
(a few samples and a high rate can overshoot), so fine-tuning never makes a block worse on its own data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pq_ao import quant_math
from pq_ao.calibration.sites import SITES, BlockSites
from pq_ao.kernels import ops
from pq_ao.passes.convert import replace_child
from pq_ao.tensors import IntxLinearWeight

SCALE_FLOOR = 1e-8  # trained scales stay positive


class TrainableQuantLinear(nn.Module):
    """`F.linear(fq(hadamard(x)), fq(W))` with straight-through rounding, trainable W and scales. The activation
    parameter is shared by the linears of a site (static scale, or the dynamic per-token clip factor)."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, act: nn.Parameter | None, bias, had_k,
                 w_bits: int, a_bits: int, act_mode: str):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.w_scale = nn.Parameter(w_scale.detach().float().clone())
        self.act = act
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)  # not trained
        self.had_k = had_k
        self.w_bits, self.a_bits, self.act_mode = w_bits, a_bits, act_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.had_k is not None:
            x = ops.hadamard_transform(x, self.had_k)
        if self.a_bits < 16:
            if self.act_mode == "static":
                s = self.act.clamp_min(SCALE_FLOOR)
            else:
                s = quant_math.per_token_scale(x.detach(), self.a_bits, self.act.clamp_min(SCALE_FLOOR))
            x = quant_math.fake_quantize(x, s, self.a_bits, ste=True)
        w = quant_math.fake_quantize(self.weight, self.w_scale.clamp_min(SCALE_FLOOR)[:, None], self.w_bits, ste=True)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def converted(self) -> IntxLinearWeight:
        """The trained values as the deployable weight (the same grid the training saw)."""
        act = self.act.detach().clamp_min(SCALE_FLOOR).reshape(1) if self.a_bits < 16 else None
        return IntxLinearWeight.from_float(
            self.weight.detach(), self.w_bits, self.a_bits, self.act_mode if self.a_bits < 16 else "none",
            act_scale=act if self.act_mode == "static" else None, had_k=self.had_k,
            w_scale=self.w_scale.detach().clamp_min(SCALE_FLOOR),
            act_clip=act if self.act_mode == "dynamic" else None,
        )  # fmt: skip


@dataclass
class FineTuneResult:
    loss_before: float
    loss_after: float  # of the values kept
    steps: int
    kept: bool  # whether the trained values replaced the calibrated ones


def _parent(bs: BlockSites, site: str) -> nn.Module:
    return bs.attn if site in ("qkv", "o") else bs.mlp


def _batches(n: int, batch: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[i : i + batch] for i in range(0, n, batch)]


def fine_tune_block(bs: BlockSites, start_weights: dict[str, list[torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
                    kwargs: dict, cfg) -> FineTuneResult:
    """Train block `bs` (already converted) towards `y = FP block(x)`; see the module docstring. `start_weights[site]`
    holds the weights training starts from for the site's linears (R4 already in down_proj's): the full-precision
    ones from before conversion, or GPTQ's compensated weights (which round to its codes)."""
    converted = {site: list(bs.linears(site)) for site in SITES}
    trainable: dict[str, list[TrainableQuantLinear]] = {}
    act_params = []
    for site, lins in converted.items():
        first = lins[0].weight
        act = None
        if cfg.a_bits < 16:
            act = nn.Parameter(first.act_range.detach().clone())  # shared by the site's linears
            act_params.append(act)
        trainable[site] = [TrainableQuantLinear(fp, lin.weight.scale, act, lin.bias, lin.weight.had_k, cfg.w_bits,
                                                cfg.a_bits, cfg.act_mode)
                           for lin, fp in zip(lins, start_weights[site])]  # fmt: skip
    kv = [q for q in (bs.attn.k_quant, bs.attn.v_quant) if q is not None and q.mode == "static"]
    kv_saved = [q.scale for q in kv]
    for q in kv:  # a leaf that requires grad, in the buffer's place
        q.scale = q.scale.detach().clone().requires_grad_(True)
        q.ste = True
    frozen = {p: p.requires_grad for p in bs.block.parameters()}  # only ours learn (norms, biases, ... stay)
    for p in frozen:
        p.requires_grad_(False)
    _swap(bs, converted, trainable)
    weights = [m.weight for ms in trainable.values() for m in ms]
    w_scales = [m.w_scale for ms in trainable.values() for m in ms]
    other_scales = act_params + [q.scale for q in kv]
    # GPTQ's codes are tied to the grid it rounded on: its weight scales stay; ft_lr_scale = 0 keeps every scale
    kept = (w_scales if cfg.gptq or cfg.ft_lr_scale == 0 else []) + (other_scales if cfg.ft_lr_scale == 0 else [])
    for t in kept:
        t.requires_grad_(False)
    trained = [t for t in w_scales + other_scales if t.requires_grad]
    groups = [{"params": weights, "lr": cfg.ft_lr_weight}]
    if trained:
        groups.append({"params": trained, "lr": cfg.ft_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + bs.index)
    n = x.shape[0]
    steps = cfg.ft_epochs * math.ceil(n / cfg.ft_batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    try:
        with torch.enable_grad():
            loss_before = _loss(bs, x, y, kwargs, cfg.ft_batch_size)
            for _ in range(cfg.ft_epochs):
                for idx in _batches(n, cfg.ft_batch_size, gen):
                    out = bs.block(x[idx], **kwargs)
                    loss = F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), y[idx].float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            loss_after = _loss(bs, x, y, kwargs, cfg.ft_batch_size)
    finally:
        improved = "loss_after" in locals() and loss_after < loss_before
        for q, saved in zip(kv, kv_saved):
            trained = q.scale.detach().clamp_min(SCALE_FLOOR)
            q.scale = trained if improved and trained.isfinite().all() else saved
            q.ste = False
        _swap(bs, trainable, converted)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    if not improved:
        return FineTuneResult(loss_before, loss_before, steps, kept=False)
    for site, lins in converted.items():
        for lin, m in zip(lins, trainable[site]):
            lin.weight = nn.Parameter(m.converted(), requires_grad=False)
    return FineTuneResult(loss_before, loss_after, steps, kept=True)


@torch.no_grad()
def _loss(bs: BlockSites, x, y, kwargs, batch: int) -> float:
    total = 0.0
    for i in range(0, x.shape[0], batch):
        out = bs.block(x[i : i + batch], **kwargs)
        total += F.mse_loss((out[0] if isinstance(out, tuple) else out).float(), y[i : i + batch].float(),
                            reduction="sum").item()  # fmt: skip
    return total / y.numel()


def _swap(bs: BlockSites, old: dict, new: dict) -> None:
    """Put the modules of `new` where those of `old` are (same sites, same order)."""
    for site in SITES:
        for a, b in zip(old[site], new[site]):
            replace_child(_parent(bs, site), a, b)
