"""Issue 3's accuracy table: quantize a model with each scheme, then WikiText-2 perplexity of the converted model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/accuracy.py --model smollm2-135m --seqlen 2048 \
        --max-windows 40 --schemes fp,rtn,quarot,static-noprefix,w4a4kv4,o1,w4a8kv4,w8a8kv8

Writes one JSON per run (`benchmarks/results/accuracy_<model>_<scheme>.json`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import pq_ao
from pq_ao.config import prefixquant_w4a4, prefixquant_w4a8, prefixquant_w8a8, quarot_w4a4
from pq_ao.eval.perplexity import perplexity

SCHEMES = {
    "fp": ("full precision", None),
    "rtn": ("W4A4KV4 RTN, no rotation (per-token dynamic A and KV)",
            lambda **k: quarot_w4a4(rotate=False, grid_search=False, **k)),
    "quarot": ("QuaRot-style: rotation + per-token dynamic A/KV (QuaRot's clips 0.9/0.95), no prefix", quarot_w4a4),
    "dynamic-noprefix": ("rotation + per-token dynamic A/KV with searched clips, no prefix (O1 less the prefix)",
                         lambda **k: quarot_w4a4(act_clip=None, kv_clip=None, **k)),
    "static-noprefix": ("PrefixQuant static, no prefix", lambda **k: prefixquant_w4a4(prefix=False, **k)),
    "w4a4kv4": ("PrefixQuant static W4A4KV4 (prefix + grid search)", prefixquant_w4a4),
    "o1": ("PrefixQuant dynamic (O1): prefix + per-token A/KV",
           lambda **k: prefixquant_w4a4(act_mode="dynamic", kv_mode="dynamic", **k)),
    "w4a8kv4": ("PrefixQuant static W4A8KV4", prefixquant_w4a8),
    "w8a8kv8": ("PrefixQuant static W8A8KV8", prefixquant_w8a8),
}  # fmt: skip


def run(model_name: str, scheme: str, seqlen: int, max_windows: int | None, dtype: torch.dtype, overrides: dict):
    label, make = SCHEMES[scheme]
    t0 = time.perf_counter()
    model, tok = pq_ao.load_model(model_name, dtype=dtype)
    row = {"scheme": scheme, "label": label, "model": model_name, "dtype": str(dtype).removeprefix("torch.")}
    if make is not None:
        config = make(**overrides)
        t = time.perf_counter()
        report = pq_ao.quantize_(model, config)
        row["quantize_seconds"] = time.perf_counter() - t
        row["config"] = config.to_dict()
        row["quantize_breakdown"] = report.seconds
        if report.prefix is not None:
            row["prefix_tokens"] = report.prefix.prefix_tokens
            row["prefix_ids"] = report.prefix.prefix_ids
            row["ratio_before"] = max(report.prefix.ratio_before)
            row["ratio_after"] = max(report.prefix.ratio_after)
    with torch.inference_mode():
        ppl = perplexity(model, tok, seqlen=seqlen, max_windows=max_windows)
    row.update(ppl=ppl.ppl, n_windows=ppl.n_windows, n_tokens=ppl.n_tokens, seqlen=seqlen, eval_seconds=ppl.seconds)
    row["total_seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--override", action="append", default=[], help="config field=value, e.g. n_samples=32")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    overrides = {}
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "device": "cpu"}  # fmt: skip
    rows = []
    for scheme in args.schemes.split(","):
        row = {**run(args.model, scheme, args.seqlen, args.max_windows, dtype, overrides), **meta}
        rows.append(row)
        name = f"accuracy_{Path(args.model).stem}_{scheme}_{args.seqlen}_{row['n_windows']}w.json"
        (args.out / name).write_text(json.dumps(row, indent=1, default=str))
        print(json.dumps({k: row[k] for k in ("scheme", "ppl", "quantize_seconds", "prefix_tokens") if k in row}))
    print("\n| scheme | ppl | quantize s | prefix |\n|---|---|---|---|")
    for r in rows:
        q = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "-"
        print(f"| {r['label']} | {r['ppl']:.2f} | {q} | {r.get('prefix_tokens', '-')} |")


if __name__ == "__main__":
    main()
