"""One GPU-box process for SmolLM2-135M (issues 4 and 5): quantize W4A4KV4 on CUDA once, then
(1) WikiText-2 ppl through the Triton kernels vs the same model on the CPU reference path (must agree within 0.5%),
(2) the deployment check of check_deploy.py on that model (AOTI .pt2, fresh process, no LD_PRELOAD).

    python3 tools/gpu/check_smollm2.py --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_deploy  # noqa: E402

import pq_ao  # noqa: E402
from pq_ao.eval.perplexity import perplexity  # noqa: E402
from pq_ao.numerics import DEFAULT as DEFAULT_NUMERICS  # noqa: E402
from pq_ao.numerics import NUMERICS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--skip", default="", help="comma-separated: ppl, deploy")
    p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS, help="compile_package's numerics")
    args = p.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pq_ao").setLevel(logging.INFO)
    torch.backends.cuda.matmul.allow_tf32 = False
    t = time.perf_counter()
    model, tok = pq_ao.load_model(args.gguf, dtype=torch.float32, device="cuda")
    row = {"model": "smollm2-135m", "config": "w4a4kv4 (defaults)", "load_s": time.perf_counter() - t,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    report = pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(), tokenizer=tok)
    torch.cuda.synchronize()
    row.update(quantize_s_cuda=time.perf_counter() - t, prefix=report.prefix.prefix_tokens, seconds=report.seconds)
    print(json.dumps(row), flush=True)
    if "ppl" not in args.skip:
        with torch.inference_mode():
            gpu = perplexity(model, tok, seqlen=2048, max_windows=args.windows, progress=False)
            row.update(ppl_cuda=gpu.ppl, eval_s_cuda=gpu.seconds, n_windows=gpu.n_windows)
            print(json.dumps(row), flush=True)
            model.to("cpu")
            cpu = perplexity(model, tok, seqlen=2048, max_windows=args.windows, progress=False)
            row.update(ppl_cpu_reference=cpu.ppl, eval_s_cpu=cpu.seconds)
        row["rel_diff"] = abs(row["ppl_cuda"] - row["ppl_cpu_reference"]) / row["ppl_cpu_reference"]
        (args.out / "check_smollm2.json").write_text(json.dumps(row, indent=1))
        model.to("cuda")
    if "deploy" not in args.skip:
        from pq_ao.kernels.triton import mutation_memo

        row["deploy"] = check_deploy.run(model, tok, "smollm2-135m", "fp32", max_len=256, new_tokens=32,
                                         out=args.out, numerics=args.numerics)  # fmt: skip
        row["deploy"]["mutation_analyses"] = mutation_memo.counts()
        print(json.dumps(row["deploy"], indent=1), flush=True)
    print(json.dumps(row, indent=1))
    (args.out / "check_smollm2.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
