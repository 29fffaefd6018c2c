"""FP baselines (issue 2): a model's WikiText-2 test perplexity at seqlen 2048 and 512, then the full zero-shot
suite (the paper's 5 tasks and LAMBADA), each a `pq-ao eval` run writing `<out>/<model>_<dtype>_<run>.json`.

    nice -n 10 .venv/bin/python benchmarks/baselines.py [--model smollm2-135m] [--dtype bf16] [--runs ...]

The zero-shot JSON is rewritten after every task, so an interrupted run keeps the tasks that finished.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pq_ao.cli import main as pq_ao_main

RUNS = {
    "wikitext2_2048": ["--tasks", "wikitext2", "--seqlen", "2048"],
    "wikitext2_512": ["--tasks", "wikitext2", "--seqlen", "512"],
    # cheapest first; hellaswag (40k requests) last
    "zeroshot": ["--tasks", "piqa,arc_easy,arc_challenge,winogrande,lambada_openai,hellaswag"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs.split(","):
        out = args.out / f"{args.model}_{args.dtype}_{run}.json"
        rc = pq_ao_main(["eval", "--model", args.model, "--dtype", args.dtype, *RUNS[run], "--json", str(out)])
        if rc:
            raise SystemExit(rc)


if __name__ == "__main__":
    main()
