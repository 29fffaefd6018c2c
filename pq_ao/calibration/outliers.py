"""Outlier tokens and the prefix, exactly as the paper defines them.

For a sample s and layer l, let M_t = max_c |down_proj input[t, c]| (before R4). Token t is an outlier when
M_t > eta * median_t(M). o = ceil(max_l mean_s count(s, l)). The prefix is the o most frequent outlier token ids
(position 0 not counted: calibration windows start mid-text), then BOS last.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pq_ao.passes.structure import decoder


@dataclass
class PrefixReport:
    """What the outlier search found: the prefix and the per-layer top/median ratios before it (outlier-search
    tokens, full-precision model) and after it (grid-search tokens, in the block-wise calibration's runs).
    `token_max_before` / `token_max_after`: the same two runs per layer as `token_max_summary` gives them (what the
    report's outlier figure draws; empty in reports written before they were recorded)."""

    prefix_ids: list[int]
    prefix_tokens: list[str]
    n_outlier_tokens: int
    mean_outliers_per_layer: list[float]
    outlier_token_counts: dict[int, int]
    ratio_before: list[float]
    ratio_after: list[float] = field(default_factory=list)
    token_max_before: list[dict] = field(default_factory=list)
    token_max_after: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        worst_before = max(range(len(self.ratio_before)), key=self.ratio_before.__getitem__)
        line = (
            f"prefix {self.prefix_tokens} (ids {self.prefix_ids}); o={self.n_outlier_tokens}; "
            f"max top/median {self.ratio_before[worst_before]:.1f} (layer {worst_before})"
        )
        if self.ratio_after:
            line += f" -> {max(self.ratio_after):.1f} with the prefix"
        return line


@torch.no_grad()
def token_max(
    model: nn.Module, modules: list[nn.Module], tokens: torch.Tensor, batch_size: int = 8, desc: str = "token max"
) -> torch.Tensor:
    """max_c |input of modules[l]| for every token: `[n_samples, n_layers, seqlen]` (fp32)."""
    n, seqlen = tokens.shape
    out = torch.empty(n, len(modules), seqlen)
    rows: slice = slice(0, 0)

    def hook(layer):
        def fn(_mod, args):
            out[rows, layer] = args[0].detach().abs().amax(-1).float().cpu()

        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
            rows = slice(start, min(start + batch_size, n))
            decoder(model)(input_ids=tokens[rows].to(device), use_cache=False)  # no LM head: only internals
    finally:
        for h in handles:
            h.remove()
    return out


def top_median_ratio(tmax: torch.Tensor) -> torch.Tensor:
    """Per layer: the largest max/median ratio over samples, `[n_layers]`."""
    ratio = tmax / tmax.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return ratio.amax(dim=-1).amax(dim=0)


FIRST_POSITION = "[position 0]"


def token_max_summary(tmax: torch.Tensor, tokens: torch.Tensor, decode, top: int = 3) -> list[dict]:
    """Per layer of the token maxima `tmax` `[n, n_layers, seqlen]` of `tokens` `[n, seqlen]`, a few JSON-safe
    numbers: `top1`, `top2`, `median` (each sample's largest, second largest and median token maximum, averaged
    over the samples) and `tokens`, the (at most `top`) tokens that most often rank first or second in a sample:
    `{"token", "token_ids", "positions", "count", "max"}` (`count` of the 2n ranks, `max` their largest value, at
    most 5 distinct ids / positions). Position 0 is one entry of its own, `FIRST_POSITION`, whatever token sits
    there (a window's first token is an outlier by its place, not its id). `decode(id) -> str` names the ids."""
    n, layers, seqlen = tmax.shape
    if tokens.shape != (n, seqlen):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match the token maxima {(n, seqlen)}")
    k = min(2, seqlen)
    vals, idx = tmax.topk(k, dim=-1)  # [n, L, k]
    top1, top2 = vals[..., 0].mean(0), vals[..., k - 1].mean(0)
    median = tmax.median(dim=-1).values.mean(0)
    out = []
    for layer in range(layers):
        groups: dict = {}
        for s in range(n):
            for j in range(k):
                pos = int(idx[s, layer, j])
                tid = int(tokens[s, pos])
                g = groups.setdefault("first" if pos == 0 else tid, {"ids": [], "pos": [], "count": 0, "max": 0.0})
                g["count"] += 1
                g["max"] = max(g["max"], float(vals[s, layer, j]))
                for key, v in (("ids", tid), ("pos", pos)):
                    if v not in g[key] and len(g[key]) < 5:
                        g[key].append(v)
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1]["count"], -kv[1]["max"]))[:top]
        out.append({
            "top1": float(top1[layer]), "top2": float(top2[layer]), "median": float(median[layer]),
            "tokens": [{"token": FIRST_POSITION if key == "first" else decode(key), "token_ids": sorted(g["ids"]),
                        "positions": sorted(g["pos"]), "count": g["count"], "max": g["max"]} for key, g in ranked],
        })  # fmt: skip
    return out


def token_decoder(tokenizer):
    """`id -> str` for the report: the tokenizer's text of one id, or `<id>` without a tokenizer."""
    if tokenizer is None:
        return lambda i: f"<{i}>"
    return lambda i: tokenizer.decode([i])


def select_prefix(
    tmax: torch.Tensor, tokens: torch.Tensor, eta: float, max_len: int, bos_id: int
) -> tuple[list[int], int, list[float], Counter]:
    """The paper's rule. Returns (prefix ids, o, mean outlier count per layer, outlier-token Counter)."""
    n, _, seqlen = tmax.shape
    if tokens.shape != (n, seqlen):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match the token maxima {(n, seqlen)}")
    outlier = tmax > eta * tmax.median(dim=-1, keepdim=True).values  # [n, L, T]
    mean_counts = outlier.sum(-1).float().mean(0)  # [L]
    o = math.ceil(mean_counts.max().item() - 1e-9)
    counter: Counter = Counter()
    positions = outlier[:, :, 1:].nonzero()  # position 0 excluded
    for s, _layer, t in positions.tolist():
        counter[int(tokens[s, t + 1])] += 1
    if len(counter) == 1 and next(iter(counter.values())) < 0.1 * n:
        o, counter = o - 1, Counter()  # a lone, rare id is noise (the paper's corner case)
    top = [tok for tok, _ in counter.most_common(max(o, 0)) if tok != bos_id]
    prefix = (top + [bos_id])[-max_len:] if max_len > 1 else [bos_id]
    return prefix, o, mean_counts.tolist(), counter


def find_prefix(
    model: nn.Module,
    down_projs: list[nn.Module],
    tokens: torch.Tensor,
    tokenizer,
    eta: float = 64.0,
    max_len: int = 8,
    batch_size: int = 8,
) -> PrefixReport:
    """Run the model over calibration `tokens` `[n, seqlen]` and choose the prefix (see module docstring). Without a
    tokenizer (token-id calibration) the separator comes from the model config and tokens are shown as `<id>`."""
    bos = prefix_separator_id(tokenizer if tokenizer is not None else model.config)
    tmax = token_max(model, down_projs, tokens, batch_size, desc="outlier tokens")
    ids, o, mean_counts, counter = select_prefix(tmax, tokens, eta, max_len, bos)
    decode = token_decoder(tokenizer)
    return PrefixReport(
        prefix_ids=ids,
        prefix_tokens=[decode(i) for i in ids],
        n_outlier_tokens=o,
        mean_outliers_per_layer=mean_counts,
        outlier_token_counts=dict(counter.most_common(20)),
        ratio_before=top_median_ratio(tmax).tolist(),
        token_max_before=token_max_summary(tmax, tokens, decode),
    )


def prefix_separator_id(tokenizer) -> int:
    """BOS, or for a model without one (Qwen) its document separator (EOS), from a tokenizer or a model config."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError(f"the {type(tokenizer).__name__} has neither a BOS nor an EOS token: cannot end the prefix "
                     "with a separator")  # fmt: skip
