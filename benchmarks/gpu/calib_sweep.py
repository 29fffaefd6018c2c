"""Accuracy sweep: quantize SmolLM2-135M with many configs, WikiText-2 ppl of each and, where asked, the zero-shot
tasks (GPU box, or `--device cpu`). Issue 19's table is one such sweep.

Each run is `{"scheme": <key of benchmarks/accuracy.py SCHEMES>, **config overrides}` plus these keys of its own:
- `"tag"`: the row's name (default: scheme + overrides); a JSON given back to a later call skips the tags it holds;
- `"prefix_only": true` with scheme `fp`: the full-precision model with the prefix of the last quantized run in
  front of every window (`perplexity(prefix_ids=...)`), the ablation's "FP + prefix" row;
- `"zeroshot": true`: also the zero-shot tasks (`pq_ao.eval.zeroshot`, `--zeroshot-limit` examples per task);
- `"save": true`: write the quantized model to `--models-dir/<tag>`; `"load": "<tag of a saved run>"`: read it
  from there instead of quantizing again (a later call on the same warm machine);
- `"ppl": false`: no perplexity (a zero-shot row of a model whose perplexity another row has).
Runs in fp32 with TF32 off, so the numerics are the CPU's (integer kernels are exact on both). Rows are written
to the JSON after every run, so a run cut off by the budget keeps what finished.

    python3 benchmarks/gpu/calib_sweep.py --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
        --runs '[{"scheme": "w4a4kv4", "seed": 0}, {"scheme": "quarot", "gptq": true}]' \
        --windows all --budget-s 500 --json $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accuracy import SCHEMES  # noqa: E402

import pq_ao  # noqa: E402
from pq_ao.eval.perplexity import perplexity  # noqa: E402

OWN_KEYS = ("scheme", "tag", "prefix_only", "zeroshot", "save", "load", "ppl")


def tag_of(run: dict) -> str:
    if "tag" in run:
        return run["tag"]
    extra = ",".join(f"{k}={v}" for k, v in sorted(run.items()) if k not in OWN_KEYS)
    return run["scheme"] + ("-prefix" if run.get("prefix_only") else "") + (f"[{extra}]" if extra else "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--runs", required=True, help="JSON list of runs (see the module docstring), or a file of one")
    p.add_argument("--windows", default="40", help="WikiText-2 windows, or 'all' (the whole test set)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=500)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="examples per zero-shot task (default: all)")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/pq_sweep_models"))
    args = p.parse_args()
    windows = None if args.windows == "all" else int(args.windows)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    base, tok = pq_ao.load_model(args.model, dtype=torch.float32, device=args.device)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    done = {r["tag"] for r in rows if "error" not in r}
    last_prefix = next((r["prefix_ids"] for r in reversed(rows) if r.get("prefix_ids")), None)
    runs = args.runs if args.runs.lstrip().startswith("[") else Path(args.runs).read_text()
    for run in json.loads(runs):
        tag = tag_of(run)
        if tag in done:
            continue
        if time.perf_counter() - start > args.budget_s:
            print("budget spent; stopping before", tag, flush=True)
            break
        scheme = run["scheme"]
        overrides = {k: v for k, v in run.items() if k not in OWN_KEYS}
        label, make = SCHEMES[scheme]
        row = {"tag": tag, "scheme": scheme, "label": label, **overrides}
        t0 = time.perf_counter()
        try:
            if run.get("load"):
                model, _ = pq_ao.load_quantized(args.models_dir / run["load"], device=args.device)
                row["loaded"] = run["load"]
            else:
                model = copy.deepcopy(base)
                if make is not None:
                    t = time.perf_counter()
                    report = pq_ao.quantize_(model, make(**overrides), tokenizer=tok)
                    sync()
                    row["quantize_s"] = time.perf_counter() - t
                    row["quantize_breakdown"] = report.seconds
                    row["config"] = report.config
                    if report.prefix is not None:
                        row["prefix_tokens"] = report.prefix.prefix_tokens
                        row["prefix_ids"] = last_prefix = report.prefix.prefix_ids
                        row["ratio_after"] = max(report.prefix.ratio_after)
                    ft = [b.finetune for b in report.blocks if b.finetune]
                    if ft:
                        row["ft_loss_before"] = sum(f["loss_before"] for f in ft)
                        row["ft_loss_after"] = sum(f["loss_after"] for f in ft)
                        row["ft_blocks_kept"] = sum(bool(f.get("kept")) for f in ft)
                    if run.get("save"):
                        pq_ao.save_quantized(model, args.models_dir / tag, tokenizer=tok)
            prefix_ids = None
            if run.get("prefix_only"):
                if last_prefix is None:
                    raise ValueError("prefix_only needs a quantized run with a prefix before it")
                prefix_ids = row["prefix_ids"] = last_prefix
            if run.get("ppl", True):
                with torch.inference_mode():
                    res = perplexity(model, tok, seqlen=args.seqlen, max_windows=windows, progress=False,
                                     prefix_ids=prefix_ids)  # fmt: skip
                row.update(ppl=res.ppl, n_windows=res.n_windows, ppl_s=res.seconds)
            if run.get("zeroshot"):
                from pq_ao.eval.zeroshot import evaluate

                zs = evaluate(model, tok, limit=args.zeroshot_limit)
                row.update(zeroshot=zs["tasks"], avg5=zs["avg5"], avg5_acc=zs["avg5_acc"],
                           zeroshot_limit=args.zeroshot_limit, zeroshot_s=zs["seconds"])  # fmt: skip
        except Exception as e:  # one failed run must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        row.update(total_s=time.perf_counter() - t0, device=device_name, dtype="float32",
                   date=time.strftime("%Y-%m-%d"), torch=torch.__version__)  # fmt: skip
        rows = [r for r in rows if r["tag"] != tag] + [row]
        args.json.write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k not in ("config", "zeroshot", "quantize_breakdown")}),
              flush=True)  # fmt: skip
        model = None
        if cuda:
            torch.cuda.empty_cache()
    print("\n| tag | ppl | avg5 | quantize s | prefix |\n|---|---:|---:|---:|---|")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else r.get("error", "-")[:60]
        avg = f"{100 * r['avg5']:.2f}" if r.get("avg5") is not None else "-"
        print(f"| {r['tag']} | {ppl} | {avg} | {r.get('quantize_s', 0):.1f} | {r.get('prefix_tokens', '-')} |")


if __name__ == "__main__":
    main()
