"""What `numerics="eager"` costs (`pq_ao.numerics`): one quantized model, its `.pt2` compiled with each numerics,
then the AOT-compile time, the package's decode latency (batch 1, greedy, through `pq_ao.runtime`), and whether
its greedy tokens are the eager model's (HF `generate` with the int4 cache).

    python3 benchmarks/bench_numerics.py --model stories260k --json benchmarks/results/numerics_stories260k_cpu.json
    python3 benchmarks/bench_numerics.py --model smollm2-shaped --layers 30 --device cuda --json $OUT/numerics.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "gpu"))
from debug_deploy import generate_tokens, load  # noqa: E402

from pq_ao import runtime  # noqa: E402
from pq_ao.export import compile_package  # noqa: E402
from pq_ao.numerics import NUMERICS  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_ms(pkg: runtime.Package, ids: torch.Tensor, steps: int, repeats: int) -> tuple[float, list[int]]:
    """Median ms per decode step over `repeats` greedy runs of `steps` steps after one prefill; the greedy tokens."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        pkg.reset()
        nxt = pkg.step(ids).argmax(-1, keepdim=True)
        toks = [nxt]
        _sync(pkg.device.type)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = pkg.step(nxt).argmax(-1, keepdim=True)
            toks.append(nxt)
        _sync(pkg.device.type)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(times[1:]), [int(x) for x in torch.cat(toks, 1)[0].tolist()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k", help="a pq_ao.load_model name, or smollm2-shaped")
    p.add_argument("--layers", type=int, default=30, help="smollm2-shaped: decoder layers")
    p.add_argument("--config", default="fast", choices=("fast", "defaults"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    model, _, ids = load(args.model, args.layers, args.device, args.config)
    with torch.no_grad():
        eager = generate_tokens(model, ids, args.max_len, args.steps + 1)
    row = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "max_len": args.max_len,
           "prompt_tokens": ids.shape[1], "steps": args.steps, "eager_tokens": eager, "numerics": {}}  # fmt: skip
    if args.model == "smollm2-shaped":
        row["layers"] = args.layers
    with tempfile.TemporaryDirectory() as tmp:
        for numerics in NUMERICS:
            t = time.perf_counter()
            pt2 = compile_package(model, Path(tmp) / f"{numerics}.pt2", 1, args.max_len, numerics=numerics)
            compile_s = time.perf_counter() - t
            ms, toks = decode_ms(runtime.load(pt2), ids, args.steps, args.repeats)
            row["numerics"][numerics] = {"compile_s": round(compile_s, 1), "decode_ms": round(ms, 3),
                                         "same_tokens_as_eager": toks == eager, "tokens": toks}  # fmt: skip
            print(numerics, json.dumps(row["numerics"][numerics]), flush=True)
    row["eager_over_inductor"] = row["numerics"]["eager"]["decode_ms"] / row["numerics"]["inductor"]["decode_ms"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=1))
    print(f"decode ms/step: eager numerics {row['numerics']['eager']['decode_ms']:.3f}, inductor "
          f"{row['numerics']['inductor']['decode_ms']:.3f} ({row['eager_over_inductor']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
