"""FP baselines (issue 2): WikiText-2 test perplexity at seqlen 2048 and 512, then the full zero-shot suite.

The zero-shot suite is the paper's 5 tasks and LAMBADA. Each run is a `pq-ao eval` writing
`<out>/<name>_<dtype>_<device>_<run>.json`.

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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", help="zero-shot tasks to run (default: all six)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="model name in the JSON file names (default: the --model stem)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.model).stem
    for run in args.runs.split(","):
        opts = RUNS[run] if run != "zeroshot" or not args.tasks else ["--tasks", args.tasks]
        out = args.out / f"{name}_{args.dtype}_{args.device.split(':')[0]}_{run}.json"
        rc = pq_ao_main(["eval", "--model", args.model, "--dtype", args.dtype, "--device", args.device, *opts,
                         "--json", str(out)])  # fmt: skip
        if rc:
            raise SystemExit(rc)


if __name__ == "__main__":
    main()
