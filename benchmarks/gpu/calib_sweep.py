"""Calibration sweep: quantize SmolLM2-135M with many configs and seeds, WikiText-2 ppl of each (GPU box, or
`--device cpu`).

Issue 3's accuracy questions (how noisy is a scheme across calibration seeds; what the paper's calibration sizes
buy; which cheaper settings keep the accuracy) need many quantize+eval runs: minutes each on the 2-core CPU,
seconds on a GPU. Runs in fp32 with TF32 off, so the numerics are the CPU's (integer kernels are exact on both).

    python3 benchmarks/gpu/calib_sweep.py --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
        --runs '[{"scheme": "w4a4kv4", "seed": 0}, {"scheme": "quarot", "seed": 1, "n_samples": 64}]' \
        --windows 40 --budget-s 500 --json $OUT/sweep.json

Each run: `scheme` (a key of benchmarks/accuracy.py SCHEMES) plus config overrides; rows are appended to the JSON
after every run, so a run cut off by the budget keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accuracy import SCHEMES  # noqa: E402

import pq_ao  # noqa: E402
from pq_ao.eval.perplexity import perplexity  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--runs", required=True, help="JSON list of {scheme, **config overrides}")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=500)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    base, tok = pq_ao.load_model(args.model, dtype=torch.float32, device=args.device)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for run in json.loads(args.runs):
        if time.perf_counter() - start > args.budget_s:
            print("budget spent; stopping before", run)
            break
        run = dict(run)
        scheme = run.pop("scheme")
        label, make = SCHEMES[scheme]
        model = copy.deepcopy(base)
        row = {"scheme": scheme, **run}
        if make is not None:
            t = time.perf_counter()
            report = pq_ao.quantize_(model, make(**run), tokenizer=tok)
            sync()
            row["quantize_s"] = time.perf_counter() - t
            if report.prefix is not None:
                row["prefix"] = report.prefix.prefix_tokens
                row["ratio_after"] = max(report.prefix.ratio_after)
        with torch.inference_mode():
            res = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        row.update(ppl=res.ppl, n_windows=res.n_windows, device=device_name, dtype="float32",
                   date=time.strftime("%Y-%m-%d"), torch=torch.__version__)
        rows.append(row)
        args.json.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    print("\n| scheme | overrides | ppl | quantize s | prefix |\n|---|---|---:|---:|---|")
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("scheme", "ppl", "quantize_s", "prefix", "ratio_after",
                                                          "n_windows", "device", "dtype", "date", "torch")}  # fmt: skip
        print(f"| {r['scheme']} | {extra} | {r['ppl']:.2f} | {r.get('quantize_s', 0):.1f} | {r.get('prefix', '-')} |")


if __name__ == "__main__":
    main()
