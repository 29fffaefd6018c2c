"""A quantization report a person can read: `report.md` and PNG figures, from a quantized model or its directory.

Two steps, so that a report can be drawn long after (and far from) the calibration that produced it:

1. `collect(model)` gathers the report data, a JSON-safe dict (`REPORT_DATA` in a directory, written by
   `pq-ao quantize` through `write_report_data`): the model's `QuantizationReport` (config, prefix, per-layer token
   maxima of the down_proj inputs before and after the prefix, per-block clip factors, activation min-max values and
   scales, block-output errors, times, calibration sizes) and what only the model holds: the prefix KV statistics
   and the K/V quantizers' ranges.
2. `draw(data, out, evals)` writes `out/report.md` and the figures `FIGURES` (matplotlib, the `report` extra).

`report(model_or_dir, out)` does both. A directory without `REPORT_DATA` (one written by `pq_ao.save_quantized`)
is loaded and collected: the same data, since the saved state holds the report and the weights hold the prefix KV.
Eval results (`pq-ao eval --json`, schema in `pq_ao.cli`) found in the directory become an FP vs quantized table.

Invariants: `collect` reads the model and changes nothing; the report data is plain JSON (a dict of lists, strings
and numbers) and `draw` reads nothing else but the eval files it is given; every figure named in `report.md` is
written next to it.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pq_ao.calibration.outliers import FIRST_POSITION
from pq_ao.state import state_of

REPORT_DATA = "report_data.json"
SCHEMA = 1
FIGURES = {
    "outliers": "outliers.png",
    "act_scales": "act_scales.png",
    "block_mse": "block_mse.png",
    "prefix_kv": "prefix_kv.png",
}
SITE_NAMES = {"qkv": "q/k/v_proj", "o": "o_proj", "gate_up": "gate/up_proj", "down": "down_proj"}
N_WORST = 3  # blocks marked worst in the block-error figure and table
LABEL_RATIO = 10.0  # the outlier figure names the tokens at >= this many times their layer's median
DPI = 100

log = logging.getLogger(__name__)


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def require_matplotlib():
    """matplotlib's `Figure` class (no pyplot: no backend, no global state), or a `MissingExtraError` naming the
    extra."""
    try:
        import matplotlib  # noqa: F401  (first: a missing package is reported as itself)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtraError(
            f"drawing the report needs matplotlib, which is not installed ({e}): pip install 'pq-ao[report]'"
        ) from None
    return Figure


# -- collecting --------------------------------------------------------------------------------------------------


def _prefix_attentions(model: nn.Module) -> list:
    from pq_ao.nn.attention import PrefixAttention

    return sorted((m for m in model.modules() if isinstance(m, PrefixAttention)), key=lambda a: a.layer_idx)


def _kv_range(quant) -> list[float] | None:
    """The largest |value| a static K/V quantizer represents before clipping, per KV head: `scale * (2**b - 1)/2`
    (the clipped min-max absmax, quant_math's contract); None for a dynamic or absent quantizer."""
    if quant is None or quant.mode != "static":
        return None
    return (quant.scale.float() * (2**quant.bits - 1) / 2).tolist()


def prefix_kv_stats(model: nn.Module) -> list[dict]:
    """Per attention layer: the prefix K and V (`prefix_k` / `prefix_v`, `[1, H_kv, P, D]`) per prefix position (L2
    norm over heads and channels, absmax) and per KV head (absmax over positions and channels), with the static K/V
    quantizers' ranges per head (`_kv_range`) that the new tokens' K and V are held to."""
    out = []
    for attn in _prefix_attentions(model):
        row: dict[str, Any] = {"layer": attn.layer_idx}
        for name in ("k", "v"):
            t = getattr(attn, f"prefix_{name}")
            if t is not None:
                t = t.detach().float()[0]  # [H, P, D]
                row[f"{name}_norm"] = t.permute(1, 0, 2).flatten(1).norm(dim=1).tolist()
                row[f"{name}_absmax"] = t.abs().amax(dim=(0, 2)).tolist()
                row[f"{name}_head_absmax"] = t.abs().amax(dim=(1, 2)).tolist()
            row[f"{name}_range"] = _kv_range(getattr(attn, f"{name}_quant"))
        out.append(row)
    return out


def collect(model: nn.Module) -> dict:
    """The report data of a model quantized by pq_ao (see the module docstring); ValueError for any other model."""
    state = state_of(model)
    if state is None or not state.quantized or state.report is None:
        raise ValueError("the model was not quantized by pq_ao (no quantization report): quantize it with "
                         "pq_ao.quantize_ first")  # fmt: skip
    rep = state.report
    cfg = model.config
    tok = state.tokenizer
    outlier_tokens = []
    if rep.prefix is not None:
        outlier_tokens = [{"token_id": int(i), "token": tok.decode([int(i)]) if tok is not None else f"<{i}>",
                           "count": int(c)} for i, c in rep.prefix.outlier_token_counts.items()]  # fmt: skip
    prefix = None
    if state.prefix_ids:
        tokens = rep.prefix.prefix_tokens if rep.prefix is not None else [f"<{i}>" for i in state.prefix_ids]
        prefix = {"ids": list(state.prefix_ids), "tokens": list(tokens), "positions": list(range(len(tokens)))}
    return {
        "schema": SCHEMA,
        "kind": "pq_ao report data",
        "source": state.source,
        "config_name": state.config.name,
        "model": {"model_type": getattr(cfg, "model_type", None), "n_layers": getattr(cfg, "num_hidden_layers", None),
                  "hidden_size": getattr(cfg, "hidden_size", None),
                  "n_heads": getattr(cfg, "num_attention_heads", None),
                  "n_kv_heads": getattr(cfg, "num_key_value_heads", None)},
        "quantization": json.loads(json.dumps(rep.to_dict())),  # JSON's own types (outlier-count keys as str)
        "prefix": prefix,
        "outlier_tokens": outlier_tokens,
        "prefix_kv": prefix_kv_stats(model),
    }  # fmt: skip


def write_report_data(model: nn.Module, directory: str | Path) -> Path:
    """`collect(model)` as `directory/REPORT_DATA` (next to a saved model: `save_quantized` leaves config.json, whose
    fields are digested, alone)."""
    path = Path(directory) / REPORT_DATA
    path.write_text(json.dumps(collect(model), indent=1) + "\n")
    return path


def load_report_data(directory: str | Path) -> dict:
    """The report data of a quantized model directory: its `REPORT_DATA`, else collected from the loaded model."""
    from pq_ao.serialization import is_quantized_dir, load_quantized

    directory = Path(directory)
    path = directory / REPORT_DATA
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: report data schema {data.get('schema')!r}; this pq_ao reads {SCHEMA}")
        return data
    if not is_quantized_dir(directory):
        raise FileNotFoundError(f"{directory} is not a quantized model directory (no {REPORT_DATA}, no pq_ao "
                                "checkpoint): run pq-ao quantize --out DIR first")  # fmt: skip
    log.info("%s holds no %s: loading the model to collect the report data", directory, REPORT_DATA)
    model, _ = load_quantized(directory)
    return collect(model)


def find_evals(directory: str | Path) -> list[Path]:
    """The `pq-ao eval --json` files in `directory` (any `*.json` whose `command` is "eval"), sorted by name."""
    out = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("command") == "eval":
            out.append(p)
    return out


# -- drawing -----------------------------------------------------------------------------------------------------


def show_token(token: str) -> str:
    """A token as figure text: Python's repr (quotes, visible \\n and spaces), `$` escaped (matplotlib's
    mathtext); `FIRST_POSITION` (any token at position 0) as itself."""
    return token if token == FIRST_POSITION else repr(token).replace("$", r"\$")


def _md_token(token: str, cell: bool = True) -> str:
    """A token in markdown: its repr as code; in a table `cell`, `|` escaped (GitHub's cell separator, even in
    code; outside a table the backslash would show)."""
    text = (token if token == FIRST_POSITION else repr(token)).replace("`", "'")
    return "`" + (text.replace("|", r"\|") if cell else text) + "`"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _g(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _new_figure(Figure, ncols: int, width: float = 12.0, height: float = 4.6):
    """A figure of `ncols` axes side by side, their x axes (layers, blocks) ticked at integers."""
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _label_outliers(ax, layers: list[dict], ratio: float = LABEL_RATIO, max_labels: int = 8) -> int:
    """Name the outlier tokens in the plot: in each layer whose top-1 reaches `ratio` x its median, the recorded top
    tokens whose largest value does too. Consecutive layers naming the same tokens get one label, at the largest
    top-1 of the run; at most `max_labels` labels (the largest). Returns the number of labels drawn."""
    runs: list[list] = []  # [layer of the run's largest top-1, names, top-1, token set]
    prev = None
    for i, layer in enumerate(layers):
        limit = ratio * layer["median"]
        names = [t["token"] for t in layer.get("tokens", []) if t["max"] >= limit] if layer["top1"] >= limit else []
        key = frozenset(names)
        if names and key == prev and layer["top1"] > runs[-1][2]:
            runs[-1][:3] = [i, names, layer["top1"]]
        elif names and key != prev:
            runs.append([i, names, layer["top1"], key])
        prev = key if names else None
    runs = sorted(sorted(runs, key=lambda r: -r[2])[:max_labels])
    for n, (i, names, y, _) in enumerate(runs):
        ax.annotate("\n".join(show_token(t) for t in names), (i, y), xytext=(6, 10 + 8 * (n % 2)),
                    textcoords="offset points", fontsize=8, color="darkred", va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "darkred", "lw": 0.5})
    return len(runs)


def draw_outliers(Figure, data: dict, path: Path) -> bool:
    """The paper's figure 1 for this model: per layer, the top-1, top-2 and median token maxima of the down_proj
    inputs, before the prefix (left) and with it (right), outlier tokens named (`_label_outliers`). False (nothing
    drawn) without the recorded token maxima."""
    p = data["quantization"].get("prefix") or {}
    before, after = p.get("token_max_before") or [], p.get("token_max_after") or []
    if not before:
        return False
    eta = float(data["quantization"]["config"].get("eta", 64.0))
    calib = data["quantization"].get("calibration") or {}
    fig, axes = _new_figure(Figure, 2 if after else 1)
    titles = [f"before the prefix (FP rotated model, {calib.get('n_samples', '?')} x {calib.get('seqlen', '?')} "
              "tokens)",
              f"with the prefix of {_n(len(p.get('prefix_ids', [])), 'token')} (during calibration, "
              f"{calib.get('grid_samples', '?')} x {calib.get('grid_seqlen', '?')} tokens)"]  # fmt: skip
    for ax, layers, title in zip(axes, (before, after), titles):
        x = list(range(len(layers)))
        ax.plot(x, [r["top1"] for r in layers], "o-", color="tab:red", label="top-1", ms=4)
        ax.plot(x, [r["top2"] for r in layers], "s-", color="tab:orange", label="top-2", ms=3)
        ax.plot(x, [r["median"] for r in layers], "^-", color="tab:blue", label="median", ms=3)
        ax.plot(x, [eta * r["median"] for r in layers], ":", color="gray", lw=1, label=f"η × median (η={eta:g})")
        _label_outliers(ax, layers)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("token-wise max |down_proj input| (mean over samples)")
    axes[0].legend(loc="upper left", fontsize=8)
    if len(axes) > 1:
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi * 3)
    prefix = ", ".join(show_token(t) for t in (data.get("prefix") or {}).get("tokens", []))
    fig.suptitle(f"{data.get('source')} {data.get('config_name')}: outlier tokens" +
                 (f" (prefix: {prefix})" if prefix else ""), fontsize=11)  # fmt: skip
    fig.savefig(path)
    return True


def draw_act_scales(Figure, data: dict, path: Path) -> bool:
    """Per layer and site: the static activation scale the model holds against the min-max scale (left; the data's
    absmax for dynamic activations), and the clip factors the grid search chose (right: activation sites, and K/V
    averaged over heads). False without the recorded per-site values."""
    from pq_ao.quant_math import scale_from_absmax

    blocks = data["quantization"].get("blocks") or []
    if not blocks or not blocks[0].get("act_absmax"):
        return False
    a_bits = int(data["quantization"]["config"].get("a_bits", 16))
    static = bool(blocks[0].get("act_scale"))
    fig, axes = _new_figure(Figure, 2)
    x = list(range(len(blocks)))
    colors = dict(zip(SITE_NAMES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for site, name in SITE_NAMES.items():
        absmax = [b["act_absmax"].get(site, math.nan) for b in blocks]
        if static:
            minmax = [scale_from_absmax(torch.tensor([a]), a_bits).item() for a in absmax]
            axes[0].plot(x, minmax, "--", color=colors[site], lw=1, alpha=0.7)
            axes[0].plot(x, [b["act_scale"].get(site, math.nan) for b in blocks], "o-", color=colors[site], ms=3,
                         label=name)
        else:
            axes[0].plot(x, absmax, "o-", color=colors[site], ms=3, label=name)
        axes[1].plot(x, [b["act_clip"].get(site, math.nan) for b in blocks], "o-", color=colors[site], ms=3,
                     label=name)
    for key, style in (("k_clip", "k:"), ("v_clip", "m:")):
        if blocks[0].get(key):
            axes[1].plot(x, [sum(b[key]) / len(b[key]) for b in blocks], style, marker="x", ms=4,
                         label=f"{key[0].upper()} (mean over heads)")
    axes[0].set_yscale("log")
    axes[0].set_title(f"static A{a_bits} scales: the model's (solid) vs min-max (dashed)" if static else
                      "activation absmax (dynamic per-token scales at run time)", fontsize=10)  # fmt: skip
    axes[0].set_ylabel("scale" if static else "absmax")
    cfg = data["quantization"]["config"]
    axes[1].set_title(f"clip factors (1 = min-max); activations {_clip_source(cfg, 'act_clip')}", fontsize=10)
    axes[1].set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data.get('source')} {data.get('config_name')}: activation scales", fontsize=11)
    fig.savefig(path)
    return True


def worst_blocks(data: dict, n: int = N_WORST) -> list[int]:
    """The `n` blocks with the largest output MSE after calibration, worst first."""
    blocks = data["quantization"].get("blocks") or []
    return sorted(range(len(blocks)), key=lambda i: -blocks[i]["mse_after"])[:n]


def draw_block_mse(Figure, data: dict, path: Path) -> bool:
    """Per block, the output MSE against the full-precision block with min-max scales (mse_before) and after the
    grid search (mse_after), the worst blocks marked. False without blocks."""
    blocks = data["quantization"].get("blocks") or []
    if not blocks:
        return False
    fig, axes = _new_figure(Figure, 1, width=10.0, height=4.2)
    ax = axes[0]
    x = torch.arange(len(blocks)).float()
    w = 0.4
    ax.bar((x - w / 2).tolist(), [b["mse_before"] for b in blocks], w, color="silver", label="min-max scales")
    after = [b["mse_after"] for b in blocks]
    done = "after the grid search" + (" and fine-tuning" if data["quantization"]["config"].get("finetune") else "")
    ax.bar((x + w / 2).tolist(), after, w, color="tab:blue", label=done)
    for rank, i in enumerate(worst_blocks(data)):
        ax.bar([float(x[i] + w / 2)], [after[i]], w, color="tab:red", label="worst" if rank == 0 else None)
        ax.annotate(f"#{rank + 1}", (float(x[i] + w / 2), after[i]), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=8, color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("block-output MSE vs the full-precision block")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{data.get('source')} {data.get('config_name')}: per-block output error after calibration",
                 fontsize=11)
    fig.savefig(path)
    return True


def draw_prefix_kv(Figure, data: dict, path: Path) -> bool:
    """Per layer, the absmax of the prefix K and V at each prefix position (kept in full precision) against the
    largest |value| the static K/V quantizers of the new tokens represent (max over heads). False without a
    prefix KV."""
    rows = [r for r in data.get("prefix_kv") or [] if "k_absmax" in r]
    if not rows:
        return False
    tokens = (data.get("prefix") or {}).get("tokens") or []
    fig, axes = _new_figure(Figure, 2)
    x = [r["layer"] for r in rows]
    n_pos = len(rows[0]["k_absmax"])
    for ax, name in zip(axes, ("K", "V")):
        key = name.lower()
        for p in range(n_pos):
            label = f"pos {p}: {show_token(tokens[p])}" if p < len(tokens) else f"pos {p}"
            ax.plot(x, [r[f"{key}_absmax"][p] for r in rows], "o-", ms=3, label=label)
        if rows[0].get(f"{key}_range"):
            ax.plot(x, [max(r[f"{key}_range"]) for r in rows], "k--", lw=1.2,
                    label=f"{name} quantizer range (new tokens)")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"prefix {name}: absmax per prefix position (full precision)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.get('source')} {data.get('config_name')}: the prefix KV", fontsize=11)
    fig.savefig(path)
    return True


# -- the markdown ------------------------------------------------------------------------------------------------


def _prefix_section(data: dict, drawn: dict[str, bool]) -> list[str]:
    q = data["quantization"]
    p = q.get("prefix")
    lines = ["## What the prefix did", ""]
    if p is None:
        return lines + [f"No prefix: {data.get('config_name')} quantizes without one (`prefix=False`), so no outlier "
                        "search ran.", ""]  # fmt: skip
    eta = q["config"].get("eta", 64.0)
    prefix = data.get("prefix") or {"ids": p["prefix_ids"], "tokens": p["prefix_tokens"],
                                    "positions": list(range(len(p["prefix_ids"])))}  # fmt: skip
    shown = ", ".join(_md_token(t, cell=False) for t in prefix["tokens"])
    lines += [f"**Prefix tokens:** {shown} ({_n(len(prefix['ids']), 'token')}, in the KV cache at positions "
              f"0..{len(prefix['ids']) - 1}; real tokens start at position {len(prefix['ids'])}).", ""]  # fmt: skip
    lines += _table(["position", "token", "id"],
                    [[pos, _md_token(t), i] for pos, t, i in zip(prefix["positions"], prefix["tokens"], prefix["ids"])])
    lines += ["", f"The outlier search found o = {p['n_outlier_tokens']} outlier tokens per sample (largest per-layer "
              f"mean of tokens whose down_proj input maximum exceeds η = {eta:g} × the median); the prefix is the "
              "most frequent outlier token ids (position 0 not counted), then the separator.", ""]  # fmt: skip
    if data.get("outlier_tokens"):
        lines += ["Most frequent outlier tokens (occurrences over samples x layers):", ""]
        lines += _table(["token", "id", "count"], [[_md_token(t["token"]), t["token_id"], t["count"]]
                                                   for t in data["outlier_tokens"][:10]])  # fmt: skip
        lines.append("")
    rb, ra = p.get("ratio_before") or [], p.get("ratio_after") or []
    if rb:
        worst = max(range(len(rb)), key=rb.__getitem__)
        line = f"Largest top-1 / median ratio: {rb[worst]:.1f} (layer {worst}) before the prefix"
        lines += [line + (f", {max(ra):.1f} with it." if ra else "."), ""]
    if drawn.get("outliers"):
        lines += [f"![token-wise maxima of the down_proj inputs, before and with the prefix]({FIGURES['outliers']})",
                  "", "Token-wise maxima of the down_proj inputs (before R4) per layer: each sample's largest (top-1), "
                  "second largest (top-2) and median token maximum, averaged over the samples. Left: the "
                  "full-precision rotated model on the outlier-search tokens; right: with the prefix in the KV "
                  "cache, on the calibration tokens, as the block-wise calibration saw them (earlier blocks "
                  f"quantized). Labels name the tokens that reach {LABEL_RATIO:g} × their layer's median "
                  f"({FIRST_POSITION}: whatever token starts the window); η × median is the paper's outlier "
                  "threshold.",
                  ""]  # fmt: skip
    before, after = p.get("token_max_before") or [], p.get("token_max_after") or []
    if before:
        def names(layer: dict) -> str:
            return ", ".join(f"{_md_token(t['token'])} @{','.join(map(str, t['positions'][:3]))} "
                             f"({t['count']}x)" for t in layer.get("tokens", [])[:2])  # fmt: skip

        rows = []
        for i, b in enumerate(before):
            a = after[i] if i < len(after) else None
            rows.append([i, _g(b["top1"]), _g(b["top2"]), _g(b["median"]), f"{b['top1'] / b['median']:.1f}",
                         names(b), _g(a and a["top1"]), _g(a and a["median"]),
                         f"{a['top1'] / a['median']:.1f}" if a else "", names(a) if a else ""])  # fmt: skip
        lines += ["<details><summary>Per layer: token maxima and the tokens that rank first or second (@positions, "
                  "how often over samples x 2 ranks)</summary>", ""]  # fmt: skip
        lines += _table(["layer", "top-1", "top-2", "median", "top-1/median", "top tokens",
                         "top-1 (prefix)", "median (prefix)", "top-1/median (prefix)", "top tokens (prefix)"], rows)
        lines += ["", "</details>", ""]
    else:
        lines += ["(This model was quantized before pq_ao recorded the per-layer token maxima: quantize it again for "
                  "the outlier figure.)", ""]  # fmt: skip
    return lines


def _prefix_kv_section(data: dict, drawn: dict[str, bool]) -> list[str]:
    rows = [r for r in data.get("prefix_kv") or [] if "k_absmax" in r]
    if not rows:
        return []
    tokens = (data.get("prefix") or {}).get("tokens") or []
    lines = ["## The prefix K and V", "",
             "The prefix KV is computed once, in full precision, and never quantized; every query attends to it. "
             "The new tokens' K and V go through the static per-head quantizers, whose ranges are shown for "
             "comparison.", ""]  # fmt: skip
    if drawn.get("prefix_kv"):
        lines += [f"![prefix K and V absmax per layer]({FIGURES['prefix_kv']})", ""]
    header = ["layer"] + [f"‖K‖ pos {p}" for p in range(len(rows[0]["k_norm"]))] + ["K absmax", "K range"] + \
        [f"‖V‖ pos {p}" for p in range(len(rows[0]["v_norm"]))] + ["V absmax", "V range"]  # fmt: skip
    table = []
    for r in rows:
        table.append([r["layer"], *(_g(v) for v in r["k_norm"]), _g(max(r["k_absmax"])),
                      _g(max(r["k_range"])) if r.get("k_range") else "", *(_g(v) for v in r["v_norm"]),
                      _g(max(r["v_absmax"])), _g(max(r["v_range"])) if r.get("v_range") else ""])  # fmt: skip
    pos = ", ".join(f"pos {p} = <code>{html.escape(repr(t))}</code>" for p, t in enumerate(tokens))  # HTML summary
    lines += [f"<details><summary>Per layer: L2 norm of the prefix K and V at each position ({pos}), their absmax, "
              "and the new tokens' quantizer range (max over heads)</summary>", ""]  # fmt: skip
    lines += _table(header, table) + ["", "</details>", ""]
    return lines


def _scales_section(data: dict, drawn: dict[str, bool]) -> list[str]:
    blocks = data["quantization"].get("blocks") or []
    if not blocks:
        return []
    cfg = data["quantization"]["config"]
    static = bool(blocks[0].get("act_scale"))
    what = ("one static scale per site: the min-max scale of the calibration activations times the clip factor"
            if static else "per-token scales at run time: each token's absmax times the clip factor")  # fmt: skip
    lines = ["## Activation scales and clip factors", "",
             f"Activations: A{cfg.get('a_bits')} {cfg.get('act_mode')}, one quantizer per site (q/k/v share one, "
             f"gate/up share one), {what}. Clip factors: activations {_clip_source(cfg, 'act_clip')}, K/V "
             f"{_clip_source(cfg, 'kv_clip')} (the grid search minimises the block-output error)."
             + (" Block-wise fine-tuning then trained the scales: the static scales shown are the trained ones."
                if cfg.get("finetune") else ""), ""]  # fmt: skip
    if drawn.get("act_scales"):
        lines += [f"![activation scales and clip factors per layer]({FIGURES['act_scales']})", ""]
    elif not blocks[0].get("act_absmax"):
        lines += ["(This model was quantized before pq_ao recorded the min-max values: the table shows the clip "
                  "factors only.)", ""]  # fmt: skip
    header = ["block"] + [f"{SITE_NAMES[s]} clip" for s in SITE_NAMES]
    if static:
        header += [f"{SITE_NAMES[s]} scale" for s in SITE_NAMES]
    header += ["K clip (heads)", "V clip (heads)"]
    rows = []
    for i, b in enumerate(blocks):
        row = [i, *(_g(b["act_clip"].get(s)) for s in SITE_NAMES)]
        if static:
            row += [_g(b["act_scale"].get(s)) for s in SITE_NAMES]
        row += [" ".join(f"{c:.2f}" for c in b.get("k_clip", [])), " ".join(f"{c:.2f}" for c in b.get("v_clip", []))]
        rows.append(row)
    lines += [f"<details><summary>Per block: clip factors{' and static scales' if static else ''}</summary>", ""]
    lines += _table(header, rows) + ["", "</details>", ""]
    return lines


def _error_section(data: dict, drawn: dict[str, bool]) -> list[str]:
    blocks = data["quantization"].get("blocks") or []
    if not blocks:
        return []
    worst = worst_blocks(data)
    w = worst[0]
    lines = ["## Block-output error", "",
             f"**Worst block: {w}** (MSE {blocks[w]['mse_after']:.3g} after calibration, {blocks[w]['mse_before']:.3g} "
             f"with min-max scales); next worst: {', '.join(f'block {i}' for i in worst[1:]) or 'none'}.", "",
             "Each block is calibrated on the outputs of the already-quantized blocks before it; the error is the "
             "MSE of its output against the full-precision block's on the same input.", ""]  # fmt: skip
    if drawn.get("block_mse"):
        lines += [f"![per-block output MSE]({FIGURES['block_mse']})", ""]
    ft = any(b.get("finetune") for b in blocks)
    if ft:
        lines += ["With block-wise fine-tuning, \"MSE after\" is after it; its own loss (on the fine-tuning tokens) "
                  "before and after is in the last columns (kept: whether the trained values replaced the calibrated "
                  "ones).", ""]  # fmt: skip
    rows = []
    for i, b in enumerate(blocks):
        row = [i, _g(b["mse_before"]), _g(b["mse_after"]), f"{b['mse_after'] / b['mse_before']:.2f}"
               if b["mse_before"] else "", f"worst #{worst.index(i) + 1}" if i in worst else ""]  # fmt: skip
        if ft:
            f = b.get("finetune") or {}
            row += [_g(f.get("loss_before")), _g(f.get("loss_after")), {True: "yes", False: "no"}.get(f.get("kept"), "")]
        rows.append(row)
    header = ["block", "MSE min-max", "MSE after", "after / min-max", ""]
    lines += _table(header + (["fine-tuning loss before", "after", "kept"] if ft else []), rows) + [""]
    return lines


def _eval_metric(task: str, res: dict) -> tuple[str, float | None]:
    if task == "wikitext2" or ("acc" not in res and "ppl" in res):
        return "ppl", res.get("ppl")
    if res.get("acc_norm") is not None and task not in ("winogrande", "lambada_openai"):
        return "acc_norm %", 100 * res["acc_norm"]
    return "acc %", None if res.get("acc") is None else 100 * res["acc"]


def _eval_label(d: dict, directory: Path | None, config_name: str) -> str:
    from pq_ao.serialization import is_quantized_dir

    model = str(d.get("model"))
    quantized = is_quantized_dir(model) or (directory is not None and Path(model).name == directory.name)
    return f"{config_name} ({Path(model).name})" if quantized else f"FP ({model})"


def _eval_section(data: dict, evals: list[Path], directory: Path | None) -> list[str]:
    """The FP vs quantized table: one column per eval file (full precision first), one row per task (perplexity,
    or accuracy in percent: acc_norm, acc for winogrande and lambada), and the paper's 5-task average."""
    runs = []
    for path in evals:
        d = json.loads(Path(path).read_text())
        runs.append((_eval_label(d, directory, data.get("config_name", "quantized")), d, Path(path)))
    if not runs:
        return []
    runs.sort(key=lambda r: not r[0].startswith("FP"))
    tasks = list(dict.fromkeys(t for _, d, _ in runs for t in d.get("results", {})))
    rows = []
    for task in tasks:
        have = [d["results"].get(task) for _, d, _ in runs]
        metric = next(_eval_metric(task, r)[0] for r in have if r is not None)
        cells = [None if r is None else _eval_metric(task, r)[1] for r in have]
        rows.append([task, metric, *("" if c is None else f"{c:.2f}" for c in cells)])
    avgs = [(d.get("summary") or {}).get("avg5") for _, d, _ in runs]
    if any(a is not None for a in avgs):
        rows.append(["avg5", "acc_norm %", *("" if a is None else f"{100 * a:.2f}" for a in avgs)])
    lines = ["## Evaluation: full precision vs quantized", ""]
    lines += _table(["task", "metric", *(label for label, _, _ in runs)], rows)
    notes = [f"{label}: {p.name}, seqlen {d.get('seqlen')}, limit {d.get('limit')}"
             + ("" if d.get("complete", True) else " (incomplete run)") for label, d, p in runs]  # fmt: skip
    lines += ["", "From " + "; ".join(notes) + ".", ""]
    return lines


def _clip_source(cfg: dict, key: str) -> str:
    """Where the clip factors of `key` ("act_clip" / "kv_clip") came from."""
    if cfg.get(key) is not None:
        return f"fixed at {cfg[key]:g} by the config"
    return "chosen by the grid search" if cfg.get("grid_search") else "1 (min-max; no grid search)"


def _header(data: dict) -> list[str]:
    q = data["quantization"]
    cfg, calib, secs = q["config"], q.get("calibration") or {}, q.get("seconds") or {}
    act = "per tensor" if cfg.get("act_mode") == "static" else "per token"
    kv = cfg.get("kv_granularity", "").replace("_", " ") if cfg.get("kv_mode") == "static" else "per token and head"
    lines = [f"# pq_ao quantization report: {data.get('source')}, {data.get('config_name')}", "",
             f"W{cfg.get('w_bits')} per channel, A{cfg.get('a_bits')} {cfg.get('act_mode')} {act}, "
             f"KV{cfg.get('kv_bits')} {cfg.get('kv_mode')} {kv}; rotation {'on' if cfg.get('rotate') else 'off'}, "
             f"prefix {'on' if cfg.get('prefix') else 'off'}; activation clips {_clip_source(cfg, 'act_clip')}, "
             f"K/V clips {_clip_source(cfg, 'kv_clip')}" + ("; weights rounded with GPTQ" if cfg.get("gptq") else "")
             + ("; block-wise fine-tuning" if cfg.get("finetune") else "") + ".", ""]  # fmt: skip
    if calib:
        search = (f"{calib.get('n_samples')} x {calib.get('seqlen')} tokens for the outlier search, "
                  if cfg.get("prefix") else "")  # fmt: skip
        ft = (f", {calib['ft_samples']} x {calib.get('ft_seqlen')} tokens for the fine-tuning"
              if "ft_samples" in calib else "")  # fmt: skip
        lines += [f"Calibration ({cfg.get('calibration')}): {search}{calib.get('grid_samples')} x "
                  f"{calib.get('grid_seqlen')} tokens for the block-wise calibration{ft}.", ""]  # fmt: skip
    if secs:
        lines += [f"Time: {sum(secs.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + ").",
                  ""]  # fmt: skip
    return lines


def draw(data: dict, out: str | Path, evals: list[str | Path] = (), directory: str | Path | None = None) -> Path:
    """Write `out/report.md` and the figures (`FIGURES`) from report data (`collect`) and `pq-ao eval --json`
    files; `directory` (the model's, if any) tells which eval ran the quantized model. Returns report.md's path."""
    Figure = require_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"outliers": draw_outliers, "act_scales": draw_act_scales, "block_mse": draw_block_mse,
               "prefix_kv": draw_prefix_kv}  # fmt: skip
    drawn = {key: fn(Figure, data, out / FIGURES[key]) for key, fn in drawers.items()}
    for key, ok in drawn.items():
        if not ok:  # a figure of an earlier report that this data cannot draw would contradict report.md
            (out / FIGURES[key]).unlink(missing_ok=True)
    lines = _header(data)
    lines += _eval_section(data, [Path(p) for p in evals], None if directory is None else Path(directory))
    lines += _prefix_section(data, drawn)
    lines += _prefix_kv_section(data, drawn)
    lines += _scales_section(data, drawn)
    lines += _error_section(data, drawn)
    lines += ["---", f"Drawn by `pq-ao report` (`pq_ao.report`) from the report data, schema {data.get('schema')}"
              f" (`{REPORT_DATA}` beside a model written by `pq-ao quantize`).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def report(model_or_dir: nn.Module | str | Path, out: str | Path | None = None,
           evals: list[str | Path] | None = None) -> Path:  # fmt: skip
    """Draw the report of a quantized model, or of a directory written by `pq-ao quantize` / `save_quantized`, into
    `out` (default: `DIR/report` for a directory; required for a model). `evals`: `pq-ao eval --json` files (default:
    those in the directory). Returns the path of report.md. A missing matplotlib is a `MissingExtraError` before any
    work."""
    require_matplotlib()
    directory = None
    if isinstance(model_or_dir, nn.Module):
        if out is None:
            raise ValueError("pq_ao.report(model) needs out=: the folder to write the report to")
        data = collect(model_or_dir)
    else:
        directory = Path(model_or_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"no directory {directory}")
        data = load_report_data(directory)
        out = directory / "report" if out is None else out
    if evals is None:
        evals = find_evals(directory) if directory is not None else []
    return draw(data, out, evals, directory)
