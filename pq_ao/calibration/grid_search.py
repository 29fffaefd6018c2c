"""Block-wise calibration: min-max init, grid search of clip factors, conversion, one block at a time.

For block i, with X its input from the already-quantized blocks 0..i-1 and Y = the full-precision block on X:
0. one run of the full-precision block gives Y, the min-max statistics of every quantizer (`stats.py`) and the
   Gram matrix of each site's input;
1. weights: per output channel, the clip factor in {1.00, 0.95, .., 0.55} minimising that channel's output error
   ||X_lin (w - q(w))||^2 (computed through the Gram matrix X_lin^T X_lin), then every linear is converted to an
   `IntxLinearWeight` (the evaluated model is the converted model);
2. K and V per head (static) or one clip (per tensor / dynamic): K by the MSE of the attention probabilities
   (causal, prefix keys included), V by reconstruction MSE; grid {1.00, 0.95, .., 0.20} (the paper's code stops at
   0.55, where SmolLM2's static V heads all landed: the optimum lies below it);
3. activations, site by site (qkv, o, gate_up, down), the clip factor minimising ||block(X) - Y||^2:
   static: coarse 0.10..1.00 (7 points), then two rounds of the best and its neighbours at half the spacing
   (resolution ~0.04, 11 block-tail passes; the paper's code searches 0.2..1 more finely, but each point costs a
   block pass and the objective is smooth at that scale); dynamic: 0.6..1.0 (9 points). Earlier
   sites keep their chosen factor while later ones are searched (coordinate descent, where the paper's code
   tunes each quantizer alone). Only the part of the block downstream of a site is recomputed, from the
   intermediates of the previous site's winning evaluation.
   A fixed `config.act_clip` / `kv_clip` (QuaRot's 0.9 / 0.95) replaces the activation / K-V search.
Then X <- quantized block(X) for block i+1. Ties go to the later grid point, as the paper's code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pq_ao import quant_math
from pq_ao.calibration.finetune import fine_tune_block
from pq_ao.calibration.gptq import gptq_quantize
from pq_ao.calibration.sites import SITES, BlockSites
from pq_ao.calibration.stats import ActStats, effective_input
from pq_ao.hf_compat import without_cache
from pq_ao.nn.attention import KVQuantizer, observe_qkv
from pq_ao.passes.convert import SitePlan, convert_site, replace_child
from pq_ao.passes.structure import decoder

WEIGHT_GRID = [1.0 - i / 20 for i in range(10)]
KV_GRID = [round(1.0 - i / 20, 6) for i in range(17)]  # 1.00 .. 0.20
STATIC_COARSE = [round(0.1 + 0.15 * i, 6) for i in range(7)]  # 0.10, 0.25, .., 1.00
STATIC_REFINE_ROUNDS = 2  # then +-0.075, +-0.0375 around the best: 11 block-tail passes, resolution ~0.04
DYNAMIC_GRID = torch.linspace(0.6, 1.0, 9).tolist()


@dataclass
class BlockPlan:
    """What calibration decides for one block (kept for the report). Per site: `act_clip` the clip factor chosen,
    `act_absmax` the min-max statistic it scales (what the weight multiplies: after R4 for down_proj), and for
    static activations `act_scale` the scale the converted weight holds at the end (min-max scale x clip, or what
    fine-tuning made of it; empty in reports written before these were recorded, and for unquantized
    activations)."""

    act_clip: dict[str, float]
    k_clip: list[float]
    v_clip: list[float]
    mse_before: float = 0.0
    mse_after: float = 0.0
    finetune: dict | None = None  # block-wise fine-tuning: its loss before / after and the steps taken
    act_absmax: dict[str, float] = field(default_factory=dict)
    act_scale: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, tokens: torch.Tensor):
    """Hidden states entering the first block `[n, T, H]` and the keyword arguments of one block call
    (position embeddings computed for batch 1, which broadcast over any batch)."""
    got: dict = {}

    def hook(_mod, args, kwargs):
        got["x"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    device = next(model.parameters()).device
    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    xs = []
    try:
        for row in tokens:
            try:
                decoder(model)(input_ids=row[None].to(device), use_cache=False)
            except _Stop:
                xs.append(got["x"])
    finally:
        h.remove()
    return torch.cat(xs), without_cache(got["kwargs"])


def _run(block: nn.Module, x: torch.Tensor, kwargs: dict, chunk: int) -> torch.Tensor:
    outs = []
    for s in range(0, x.shape[0], chunk):
        out = block(x[s : s + chunk], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a.float(), b.float()).item()


def _argmin(values: list[float], grid: list[float]) -> float:
    best = min(values)
    return [g for g, v in zip(grid, values) if v == best][-1]  # ties -> later grid point


def _coarse_to_fine(objective, grid: list[float], rounds: int) -> float:
    """The best point of an evenly spaced `grid`, then `rounds` times the best of it and its two neighbours at half
    the previous spacing (clip factors stay in (0, 1]). Each objective value is computed once."""
    errs = {a: objective(a) for a in grid}

    def best() -> float:
        pts = sorted(errs)
        return _argmin([errs[a] for a in pts], pts)

    step = grid[1] - grid[0]
    for _ in range(rounds):
        step /= 2
        centre = best()
        for a in (round(centre - step, 6), round(centre + step, 6)):
            if 0 < a <= 1 and a not in errs:
                errs[a] = objective(a)
    return best()


def weight_clip(w: torch.Tensor, gram: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel clip factor minimising d^T G d, d = w_n - q(w_n)."""
    w = w.float()
    s0 = quant_math.scale_from_absmax(w.abs().amax(1, keepdim=True), bits)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    for a in WEIGHT_GRID:
        d = w - quant_math.fake_quantize(w, s0 * a, bits)
        err = ((d @ gram) * d).sum(1)
        better = err <= best_err
        best_err = torch.where(better, err, best_err)
        best[better] = a
    return best


class BlockCalibrator:
    """Runs steps 1-3 of the module docstring on one block."""

    def __init__(self, config, chunk: int = 4):
        self.cfg = config
        self.stats = ActStats()
        self.chunk = chunk

    # -- step 1 ------------------------------------------------------------------------------------------------
    def _grams(self, bs: BlockSites, x: torch.Tensor, kwargs: dict):
        """One run of the full-precision block: its output, the Gram matrix of each site's input (after R4 for
        down_proj), q/k/v, and the block's statistics (into `self.stats`)."""
        grams: dict[str, torch.Tensor] = {}
        qkv: list = []

        def hook(site):
            def fn(_mod, args):
                inp = effective_input(_mod, args[0])
                self.stats.observe_site(bs.index, site, args[0], inp)
                inp = inp.reshape(-1, args[0].shape[-1]).float()
                g = inp.T @ inp
                grams[site] = grams[site] + g if site in grams else g

            return fn

        def keep(_attn, q, k, v):
            self.stats.observe_kv(bs.index, k, v)
            qkv.append((q.float(), k.float(), v.float()))

        handles = [bs.linears(site)[0].register_forward_pre_hook(hook(site)) for site in SITES]
        try:
            with observe_qkv([bs.attn], keep):
                y = _run(bs.block, x, kwargs, self.chunk)
        finally:
            for h in handles:
                h.remove()
        q, k, v = (torch.cat(t) for t in zip(*qkv))
        return y, grams, (q, k, v)

    def _convert(self, bs: BlockSites, grams: dict) -> dict[str, list[torch.Tensor]]:
        """Step 1's plan for every site (weight clips; the activation absmax from the statistics), then the
        conversion pass builds the weights from it. Returns GPTQ's compensated weights per site (empty without
        GPTQ): where fine-tuning starts."""
        cfg = self.cfg
        compensated = {}
        for site in SITES:
            lins = bs.linears(site)
            clips = [weight_clip(lin.weight.detach(), grams[site], cfg.w_bits) if cfg.grid_search else None
                     for lin in lins]  # fmt: skip
            plan = SitePlan(act_absmax=self.stats.act[(bs.index, site)], weight_clips=clips)
            if cfg.gptq:  # the same grid (scales), GPTQ's rounding through the site's Gram matrix
                plan.weight_scales = [quant_math.per_channel_scale(lin.weight.detach().float(), cfg.w_bits, clip)
                                      for lin, clip in zip(lins, clips)]  # fmt: skip
                codes, compensated[site] = zip(*(
                    gptq_quantize(lin.weight.detach().float(), grams[site], s, cfg.w_bits, cfg.gptq_damp,
                                  cfg.gptq_block_size, cfg.gptq_act_order)
                    for lin, s in zip(lins, plan.weight_scales)))  # fmt: skip
                plan.weights = [q.float() * s[:, None] for q, s in zip(codes, plan.weight_scales)]
            new = convert_site(lins, plan, w_bits=cfg.w_bits, a_bits=cfg.a_bits, act_mode=cfg.act_mode)
            for lin, mod in zip(lins, new):
                if mod is not lin:  # an HadamardLinear (R4) became a plain Linear with R4 in its weight
                    replace_child(bs.mlp, lin, mod)
                    bs.down = mod
        return compensated

    # -- step 2 ------------------------------------------------------------------------------------------------
    def _kv(self, bs: BlockSites, qkv) -> tuple[list[float], list[float]]:
        cfg = self.cfg
        if cfg.kv_bits >= 16:
            return [], []
        q, k, v = qkv
        attn = bs.attn
        per_head = cfg.kv_mode == "static" and cfg.kv_granularity == "per_head"
        grid = KV_GRID if cfg.kv_mode == "static" else DYNAMIC_GRID
        clips = {}
        for name in ("k", "v"):
            absmax = getattr(self.stats, name)[bs.index]
            quant = KVQuantizer(cfg.kv_bits, attn.n_kv_heads, cfg.kv_mode).to(absmax.device)
            base = absmax if per_head else absmax.amax().expand_as(absmax).clone()
            if cfg.kv_clip is not None:
                choice = [cfg.kv_clip] * attn.n_kv_heads
            elif cfg.grid_search:
                err = _k_errors(attn, q, k, quant, grid, base) if name == "k" else _v_errors(v, quant, grid, base)
                if per_head:
                    choice = [_argmin(err[:, h].tolist(), grid) for h in range(err.shape[1])]
                else:
                    choice = [_argmin(err.sum(1).tolist(), grid)] * err.shape[1]
            else:
                choice = [1.0] * attn.n_kv_heads
            _set_kv(quant, base, torch.tensor(choice, device=base.device))
            setattr(attn, f"{name}_quant", quant)
            clips[name] = choice
        return clips["k"], clips["v"]

    # -- step 3 ------------------------------------------------------------------------------------------------
    def _tail(self, bs: BlockSites, site: str, x: torch.Tensor, kwargs: dict, cap: dict):
        """The block output recomputed from the first module that reads `site` (pre-norm residual block), and what
        the later sites' tails start from, captured on the way: o_proj's input `a`, the mid residual `h`
        (mlp_norm's input), the MLP input `n2` and down_proj's input `u`."""
        got: dict[str, list] = {"a": [], "h": [], "n2": [], "u": []}

        def keep(key):
            def fn(_mod, args):
                got[key].append(args[0])

            return fn

        pairs = {"qkv": (("a", bs.o), ("h", bs.mlp_norm), ("n2", bs.mlp), ("u", bs.down)),
                 "o": (("n2", bs.mlp), ("u", bs.down)), "gate_up": (("u", bs.down),), "down": ()}[site]  # fmt: skip
        handles = [mod.register_forward_pre_hook(keep(key)) for key, mod in pairs]
        try:
            if site == "qkv":
                out = _run(bs.block, x, kwargs, self.chunk)
            elif site == "o":
                h = x + bs.o(cap["a"])
                got["h"].append(h)
                out = h + bs.mlp(bs.mlp_norm(h))
            elif site == "gate_up":
                out = cap["h"] + bs.mlp(cap["n2"])
            else:
                out = cap["h"] + bs.down(cap["u"])
        finally:
            for h in handles:
                h.remove()
        return out, {**cap, **{k: torch.cat(v) for k, v in got.items() if v}}

    def _act(self, bs: BlockSites, x, kwargs, y) -> tuple[dict[str, float], torch.Tensor, float]:
        """Search the sites in order. Returns the chosen clips, the block output with all of them, and the error
        with every activation at its min-max scale (a point of every search). Each site's tails start
        from the intermediates of the previous site's winning evaluation (the same tensors a fresh pass computes:
        only the sites downstream of them changed), and the last winner's output is the block output."""
        cfg = self.cfg
        if cfg.a_bits >= 16 or cfg.act_clip is not None or not cfg.grid_search:
            out = _run(bs.block, x, kwargs, self.chunk)
            if cfg.a_bits >= 16:
                return {}, out, _mse(out, y)
            best = 1.0 if cfg.act_clip is None else cfg.act_clip
            for site in SITES:
                for lin in bs.linears(site):
                    lin.weight.set_act_range(lin.weight.act_range * best)
            final = out if best == 1.0 else _run(bs.block, x, kwargs, self.chunk)
            return {s: best for s in SITES}, final, _mse(out, y)
        chosen, cap, out, mse_minmax = {}, {}, None, 0.0
        for site in SITES:
            lins = bs.linears(site)
            base = [lin.weight.act_range.clone() for lin in lins]  # min-max scale / clip 1: what the factor scales
            errs: dict[float, float] = {}
            winner: dict = {}

            def objective(a: float, site=site, lins=lins, base=base, errs=errs, winner=winner, prev=cap) -> float:
                for lin, b in zip(lins, base):
                    lin.weight.set_act_range(b * a)
                tail, tail_cap = self._tail(bs, site, x, kwargs, prev)
                errs[a] = _mse(tail, y)
                pts = sorted(errs)
                if _argmin([errs[p] for p in pts], pts) == a:  # the final winner is the best when it is evaluated
                    winner.update(a=a, out=tail, cap=tail_cap)
                return errs[a]

            if cfg.act_mode == "static":
                best = _coarse_to_fine(objective, STATIC_COARSE, STATIC_REFINE_ROUNDS)
            else:
                best = _argmin([objective(a) for a in DYNAMIC_GRID], DYNAMIC_GRID)
            assert winner["a"] == best
            for lin, b in zip(lins, base):
                lin.weight.set_act_range(b * best)
            if site == "qkv":
                mse_minmax = errs[1.0]  # every grid holds 1.0
            chosen[site], cap, out = best, winner["cap"], winner["out"]
        return chosen, out, mse_minmax

    @torch.no_grad()
    def __call__(self, bs: BlockSites, x: torch.Tensor, kwargs: dict, x_ft: torch.Tensor | None = None,
                 ft_kwargs: dict | None = None):
        """Calibrate block `bs` on its inputs `x` (block keyword arguments `kwargs`); with `x_ft` (the fine-tuning
        stream, its own `ft_kwargs`) also fine-tune it. Returns (the block's quantized output on x, on x_ft or None,
        the plan)."""
        y, grams, qkv = self._grams(bs, x, kwargs)
        if x_ft is not None:  # the fine-tuning targets (and weights), while the block is still full precision
            y_ft = _run(bs.block, x_ft, ft_kwargs, self.chunk)
            if not self.cfg.gptq:
                start = {site: [lin.weight.detach().float().clone() for lin in bs.linears(site)] for site in SITES}
        compensated = self._convert(bs, grams)
        k_clip, v_clip = self._kv(bs, qkv)
        act_clip, x_next, mse_minmax = self._act(bs, x, kwargs, y)
        ft = None
        if x_ft is not None:
            if self.cfg.gptq:  # GPTQ's compensated weights: they round to its codes (finetune.py)
                start = {site: list(compensated[site]) for site in SITES}
            result = fine_tune_block(bs, start, x_ft, y_ft, ft_kwargs, self.cfg)
            ft = {"loss_before": result.loss_before, "loss_after": result.loss_after, "steps": result.steps,
                  "kept": result.kept}
            x_next = _run(bs.block, x, kwargs, self.chunk)
            x_ft = _run(bs.block, x_ft, ft_kwargs, self.chunk)
        weights = {site: bs.linears(site)[0].weight for site in SITES}  # as the model holds them (fine-tuned or not)
        act_scale = {site: w.act_scale.item() for site, w in weights.items() if w.act_mode == "static"}
        plan = BlockPlan(act_clip=act_clip, k_clip=k_clip, v_clip=v_clip, mse_before=mse_minmax,
                         mse_after=_mse(x_next, y), finetune=ft,
                         act_absmax={s: self.stats.act[(bs.index, s)] for s in SITES}, act_scale=act_scale)  # fmt: skip
        return x_next, x_ft, plan


def _k_errors(attn, q, k, kq: KVQuantizer, grid, base, max_queries: int = 256) -> torch.Tensor:
    """MSE of softmax(q k^T) per KV head for each clip factor: `[len(grid), H_kv]`."""
    n_kv, rep = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads
    t = k.shape[2]
    qs = q[:, :, -max_queries:]  # the last queries see the most keys
    nq = qs.shape[2]
    causal = torch.ones(nq, t, dtype=torch.bool, device=q.device).tril(t - nq)
    pk = attn.prefix_k.float() if attn.prefix_k is not None else None

    def probs(kk: torch.Tensor) -> torch.Tensor:
        kk = kk.repeat_interleave(rep, dim=1)
        logits = (qs @ kk.transpose(-1, -2)) * attn.scaling
        logits = logits.masked_fill(~causal, float("-inf"))
        if pk is not None:
            pre = (qs @ pk.repeat_interleave(rep, dim=1).transpose(-1, -2)) * attn.scaling
            logits = torch.cat([pre.expand(logits.shape[0], -1, -1, -1), logits], dim=-1)
        return logits.softmax(-1)

    ref = probs(k)
    out = []
    for a in grid:
        _set_kv(kq, base, a)
        err = (probs(kq(k)) - ref).pow(2)  # [B, H, nq, P+T]
        out.append(err.view(err.shape[0], n_kv, rep, -1).mean(dim=(0, 2, 3)))
    return torch.stack(out)


def _v_errors(v, vq: KVQuantizer, grid, base) -> torch.Tensor:
    out = []
    for a in grid:
        _set_kv(vq, base, a)
        out.append((vq(v) - v).pow(2).mean(dim=(0, 2, 3)))
    return torch.stack(out)


def _set_kv(quant: KVQuantizer, base_absmax: torch.Tensor, a) -> None:
    """Clip `a` (a float or one per head): static scales are min-max scales of `base_absmax` [H_kv] times `a`;
    dynamic quantizers keep `a` as their clip on each token's absmax."""
    if quant.mode == "static":
        quant.scale.copy_(quant_math.scale_from_absmax(base_absmax, quant.bits) * a)
    else:
        quant.clip = float(a if isinstance(a, float) else a[0])


def calibrate_blocks(model: nn.Module, blocks: list[BlockSites], tokens: torch.Tensor, config,
                     ft_tokens: torch.Tensor | None = None):
    """Steps 1-3 for every block in order (and block-wise fine-tuning on `ft_tokens`, when given); returns the
    per-block plans and the statistics gathered."""
    x, kwargs = capture_block_inputs(model, blocks[0].block, tokens)
    # the fine-tuning stream has its own length (ft_seqlen), so its own rotary embeddings and mask
    x_ft, ft_kwargs = capture_block_inputs(model, blocks[0].block, ft_tokens) if ft_tokens is not None else (None, None)
    cal = BlockCalibrator(config)
    plans = []
    bar = tqdm(blocks, desc="calibrating blocks" + (" + fine-tuning" if x_ft is not None else ""), leave=False)
    for bs in bar:
        x, x_ft, plan = cal(bs, x, kwargs, x_ft, ft_kwargs)
        plans.append(plan)
        if plan.finetune is not None:
            bar.set_postfix(ft_loss=f"{plan.finetune['loss_before']:.3g}->{plan.finetune['loss_after']:.3g}")
    return plans, cal.stats
