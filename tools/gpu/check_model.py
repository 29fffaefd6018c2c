"""GPU check of the whole quantized model: quantize on CUDA (Triton kernels), then WikiText-2 perplexity of the
same converted model on CUDA and on the CPU reference path; the two must agree within 0.5%.

    python3 tools/gpu/check_model.py --model stories260k --seqlen 256 --windows 16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pq_ao
from pq_ao.eval.perplexity import perplexity


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k")
    p.add_argument("--config", default="w4a4kv4")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    from pq_ao.config import preset

    model, tok = pq_ao.load_model(args.model, dtype=torch.float32, device="cuda")
    t = time.perf_counter()
    report = pq_ao.quantize_(model, preset(args.config), tokenizer=tok)
    torch.cuda.synchronize()
    row = {"model": args.model, "config": args.config, "quantize_seconds_cuda": time.perf_counter() - t,
           "prefix": report.prefix.prefix_tokens if report.prefix else None, "device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        gpu = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        row["ppl_cuda"], row["eval_seconds_cuda"] = gpu.ppl, gpu.seconds
        model.to("cpu")
        cpu = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        row["ppl_cpu_reference"], row["eval_seconds_cpu"] = cpu.ppl, cpu.seconds
    row["rel_diff"] = abs(row["ppl_cuda"] - row["ppl_cpu_reference"]) / row["ppl_cpu_reference"]
    print(json.dumps(row, indent=1))
    (args.out / f"check_model_{args.model}_{args.config}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
