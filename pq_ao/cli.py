"""The `pq-ao` command.

Subcommands are functions registered with `@subcommand(arg(...), ...)`: the function's name (less `cmd_`)
is the subcommand, its docstring the help, the `arg`s its options; it gets the parsed namespace and returns an
exit code. A new subcommand (quantize, export, generate) is one such function. User errors (`ValueError`,
`FileNotFoundError`: unknown model or task, missing dataset, seqlen too long) print one line on stderr and
exit 1, without a traceback.

`pq-ao eval --json out.json` writes (and rewrites after each task, so a long run keeps what finished):

    {"schema": 1, "command": "eval", "model": str, "dtype": "bf16"|"fp32", "seqlen": int, "limit": int|null,
     "batch_size": int|null, "tasks": [str], "device": str, "date": ISO-8601 UTC start, "complete": bool,
     "versions": {"torch", "transformers", "lm_eval", "python"}, "machine": {"platform", "cpus", "device"},
     "wall_seconds": {"load_model", "total"},
     "results": {"wikitext2": {"ppl", "nll", "n_windows", "n_tokens", "seqlen", "seconds"},
                 "<zero-shot task>": {"acc", "acc_norm" (not winogrande, lambada), "ppl" (lambada),
                                      "<metric>_stderr", "n", "seconds"}},
     "summary": {"avg5": the paper's 5-task average (acc_norm; acc for winogrande) or null,
                 "avg5_acc": the same with acc everywhere, or null}}

Accuracies are fractions in [0, 1]; the wikitext2 perplexity is `results.wikitext2.ppl`.

`pq-ao quantize --out DIR` also writes `DIR/report_data.json` (`pq_ao.reporting`: what the report's figures need),
and `pq-ao report DIR` draws `DIR/report/report.md` and its figures from it, with a table of the eval JSONs found
in DIR (write them there with `pq-ao eval --json DIR/eval_fp.json`, ...). Drawing needs matplotlib
(`pip install 'pq-ao[report]'`); without it the command says so in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pq_ao.numerics import DEFAULT as DEFAULT_NUMERICS
from pq_ao.numerics import NUMERICS
from pq_ao.reporting import MissingExtraError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bf16 on CUDA; fp32 on CPU (bf16 matmuls are slow on CPUs without AVX512-BF16)
PPL_TASKS = ("wikitext2",)
USER_ERRORS = (ValueError, FileNotFoundError, MissingExtraError)

_SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], tuple]] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One `add_argument` call, for `subcommand`."""
    return flags, kwargs


def subcommand(*args: tuple[tuple[str, ...], dict[str, Any]]):
    """Register the decorated `cmd_<name>(namespace) -> int` as `pq-ao <name>` with options `args`."""

    def register(fn: Callable[[argparse.Namespace], int]):
        _SUBCOMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = (fn, args)
        return fn

    return register


MODEL_ARGS = (
    arg("--model", required=True,
        help="a known name (smollm2-135m, stories260k), a HF model dir, a .gguf file or a hub id"),
    arg("--dtype", choices=DTYPE_CHOICES, default="auto", help="model dtype (default auto: bf16 on CUDA, fp32 on CPU)"),
    arg("--device", default="cpu", help="torch device to run on (default cpu)"),
)  # fmt: skip


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def resolve_model(name_or_dir: str, dtype: torch.dtype, device: str = "cpu"):
    """(model, tokenizer) for a `--model` argument: the one place that maps the argument to a model. A directory
    written by `pq-ao quantize` (or `pq_ao.save_quantized`) loads as the quantized model it holds."""
    from pq_ao.models import load_model
    from pq_ao.serialization import is_quantized_dir, load_quantized

    if is_quantized_dir(name_or_dir):
        model, tokenizer = load_quantized(name_or_dir, device=device)
        if tokenizer is None:
            raise ValueError(f"{name_or_dir} holds no tokenizer; it is needed for evaluation")
        return model, tokenizer
    return load_model(name_or_dir, dtype=dtype, device=device)


def _check_writable_dir(path: Path) -> None:
    """Refuse an output directory that cannot be written, before the work that would fill it."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".pq_ao_write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out {path}: {e.strerror or e}") from e


def _warn_long_seqlen(model, seqlen: int) -> None:
    """One line on stderr when the windows go past the positions the model was trained on."""
    from pq_ao.state import state_of

    n = getattr(model.config, "max_position_embeddings", None)
    state = state_of(model)
    prefix = len(state.prefix_ids) if state else 0
    if n is not None and seqlen + prefix > n:
        print(f"pq-ao eval: warning: --seqlen {seqlen}{f' + {prefix} prefix tokens' if prefix else ''} exceeds "
              f"the model's max_position_embeddings ({n}): positions past it were never trained", file=sys.stderr)


def _parse_tasks(spec: str) -> list[str]:
    from pq_ao.eval import zeroshot

    known = (*PPL_TASKS, *zeroshot.TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or spec!r}; known tasks: {', '.join(known)}")
    return tasks


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": metadata.version("lm_eval"),
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def _progress(command: str):
    """pq_ao's INFO log lines (each phase of the pipeline) on stderr as `pq-ao <command>: ...`, for the duration."""
    logger = logging.getLogger("pq_ao")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"pq-ao {command}: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


@subcommand(
    *MODEL_ARGS,
    arg("--tasks", default="wikitext2",
        help="comma-separated: wikitext2, piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
        "lambada_openai (default wikitext2)"),
    arg("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)"),
    arg("--limit", type=int, help="at most this many perplexity windows / examples per zero-shot task"),
    arg("--batch-size", type=int, help="windows (default 1) or lm-eval requests (default 16) per forward"),
    arg("--json", type=Path, help="write the results here (schema: pq_ao.cli docstring)"),
)  # fmt: skip
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model: WikiText-2 perplexity and lm-eval zero-shot tasks, on local data."""
    from pq_ao import data
    from pq_ao.eval import perplexity, zeroshot
    from pq_ao.eval.report import format_table

    start = time.perf_counter()
    tasks = _parse_tasks(args.tasks)
    for t in tasks:
        data.check_available(t)
    report: dict[str, Any] = {
        "schema": 1,
        "command": "eval",
        "model": args.model,
        "dtype": args.dtype,
        "seqlen": args.seqlen,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "tasks": tasks,
        "device": args.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "versions": _versions(),
        "wall_seconds": {},
        "results": {},
        "summary": {},
    }

    def save() -> None:
        report["wall_seconds"]["total"] = time.perf_counter() - start
        if args.json is not None:
            _write_json(args.json, report)

    model, tokenizer = resolve_model(args.model, resolve_dtype(args.dtype, args.device), args.device)
    device = next(model.parameters()).device
    report["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
    }
    report["wall_seconds"]["load_model"] = time.perf_counter() - start
    if any(t in PPL_TASKS for t in tasks):
        _warn_long_seqlen(model, args.seqlen)
    save()
    for t in (t for t in tasks if t in PPL_TASKS):
        res = perplexity.perplexity(
            model, tokenizer, t, seqlen=args.seqlen, batch_size=args.batch_size or 1, max_windows=args.limit
        )
        report["results"][t] = res.to_dict()
        save()
    zs_tasks = [t for t in tasks if t in zeroshot.TASKS]
    if zs_tasks:

        def on_task(task: str, metrics: dict[str, Any]) -> None:
            report["results"][task] = metrics
            save()

        zs = zeroshot.evaluate(
            model, tokenizer, zs_tasks, limit=args.limit, batch_size=args.batch_size or 16, on_task=on_task
        )
        report["summary"] = {"avg5": zs["avg5"], "avg5_acc": zs["avg5_acc"]}
    report["complete"] = True
    save()
    limit = f", limit {args.limit}" if args.limit else ""
    print(f"\n{args.model} ({args.dtype}, seqlen {args.seqlen}{limit})")
    print(format_table(report["results"], report["summary"]))
    if args.json is not None:
        print(f"results written to {args.json}")
    return 0


@subcommand(
    *MODEL_ARGS,
    arg("--config", required=True, help="w4a4kv4, w4a8kv4, w8a8kv8 or quarot-w4a4kv4"),
    arg("--out", type=Path, required=True, help="directory to write the quantized model to"),
    arg("--calibration", default="c4", help="calibration text: c4 or wiki (default c4)"),
    arg("--n-samples", type=int, help="outlier-search samples (config default 32)"),
    arg("--calib-seqlen", type=int, help="outlier-search sample length (default 512)"),
    arg("--grid-samples", type=int, help="grid-search samples (default 2)"),
    arg("--grid-seqlen", type=int, help="grid-search sample length (default 512)"),
    arg("--no-grid-search", action="store_true", help="min-max scales only"),
    arg("--gptq", action="store_true", help="round the weights with GPTQ (on the same per-channel grid)"),
    arg("--gptq-act-order", action="store_true", help="GPTQ rounds the columns by decreasing Hessian diagonal"),
    arg("--finetune", action="store_true", help="block-wise fine-tuning of weights and scales after the search"),
    arg("--ft-samples", type=int, help="fine-tuning samples (default 32)"),
    arg("--ft-seqlen", type=int, help="fine-tuning sample length (default 512)"),
    arg("--ft-epochs", type=int, help="fine-tuning epochs (default 2)"),
    arg("--seed", type=int, default=0),
    arg("--json", type=Path, help="write the quantization report here"),
)  # fmt: skip
def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a model with a PrefixQuant preset and save it (safetensors + JSON) for `pq-ao eval --model DIR`."""
    import pq_ao
    from pq_ao.config import preset
    from pq_ao.reporting import REPORT_DATA, write_report_data

    overrides = {"n_samples": args.n_samples, "seqlen": args.calib_seqlen, "grid_samples": args.grid_samples,
                 "grid_seqlen": args.grid_seqlen, "ft_samples": args.ft_samples, "ft_seqlen": args.ft_seqlen,
                 "ft_epochs": args.ft_epochs}  # fmt: skip
    config = preset(args.config, calibration=args.calibration, seed=args.seed, grid_search=not args.no_grid_search,
                    gptq=args.gptq, gptq_act_order=args.gptq_act_order, finetune=args.finetune,
                    **{k: v for k, v in overrides.items() if v is not None})  # fmt: skip
    start = time.perf_counter()
    _check_writable_dir(args.out)
    with _progress("quantize") as log:
        log.info("loading %s", args.model)
        model, tokenizer = resolve_model(args.model, resolve_dtype(args.dtype, args.device), args.device)
        report = pq_ao.quantize_(model, config, tokenizer=tokenizer)
        log.info("saving to %s (with %s: pq-ao report %s draws it)", args.out, REPORT_DATA, args.out)
        pq_ao.save_quantized(model, args.out, tokenizer)
        write_report_data(model, args.out)
    print(report.summary())
    print(f"saved to {args.out} ({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        out = {"schema": 1, "command": "quantize", "model": args.model, "config": args.config, "out": str(args.out),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": _versions(), "report": report.to_dict()}  # fmt: skip
        _write_json(args.json, out)
    return 0


@subcommand(
    arg("dir", type=Path, help="a directory written by pq-ao quantize (or pq_ao.save_quantized)"),
    arg("--out", type=Path, help="the folder to write report.md and the figures to (default DIR/report)"),
    arg("--eval", type=Path, action="append", dest="evals", metavar="JSON",
        help="a pq-ao eval --json file to tabulate (repeatable; default: the eval JSONs in DIR)"),
)  # fmt: skip
def cmd_report(args: argparse.Namespace) -> int:
    """Draw a quantization report (report.md + PNG figures): outliers before and after the prefix, the prefix KV,
    activation scales and clip factors, per-block errors, and FP vs quantized eval results where they exist."""
    from pq_ao.reporting import report, require_matplotlib

    require_matplotlib()  # before loading anything
    for p in args.evals or []:
        if not p.is_file():
            raise FileNotFoundError(f"no eval JSON at {p}")
    start = time.perf_counter()
    with _progress("report"):
        path = report(args.dir, out=args.out, evals=args.evals)
    figures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"wrote {path} and {len(figures)} figures ({', '.join(figures)}) in {time.perf_counter() - start:.0f} s")
    return 0


@subcommand(
    arg("--model", required=True, help="a directory written by pq-ao quantize (or pq_ao.save_quantized)"),
    arg("--out", type=Path, required=True, help="the .pt2 to write"),
    arg("--max-len", type=int, default=2048, help="KV-cache slots: prompt + generated tokens (default 2048)"),
    arg("--batch-size", type=int, default=1, help="sequences per call, fixed in the package (default 1)"),
    arg("--device", default="cpu", help="device to compile for (cpu or cuda; default cpu)"),
    arg("--dtype", choices=DTYPE_CHOICES, default="auto",
        help="activation dtype (default auto: bf16 on CUDA, fp32 on CPU)"),
    arg("--numerics", choices=NUMERICS, default=DEFAULT_NUMERICS,
        help="eager (default): compile with eager's rounding, so the package's greedy text is eager's; inductor: "
             "inductor's own rounding, fewer launches (pq_ao.numerics)"),
)  # fmt: skip
def cmd_export(args: argparse.Namespace) -> int:
    """torch.export the quantized model's prefill and decode (int KV cache) and AOT-compile them into one .pt2."""
    from pq_ao.export import compile_package
    from pq_ao.serialization import is_quantized_dir

    if not is_quantized_dir(args.model):
        raise ValueError(f"{args.model} is not a quantized model directory (run pq-ao quantize --out DIR first)")
    if not str(args.out).endswith(".pt2"):
        raise ValueError(f"--out must name a .pt2 file, got {args.out}")
    start = time.perf_counter()
    model, tokenizer = resolve_model(args.model, torch.float32, args.device)
    model.to(resolve_dtype(args.dtype, args.device))
    path = compile_package(model, args.out, args.batch_size, args.max_len, tokenizer, numerics=args.numerics)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {time.perf_counter() - start:.0f} s): prefill + decode, batch "
          f"{args.batch_size}, {args.max_len} cache slots, {args.device}")  # fmt: skip
    return 0


@subcommand(
    arg("--package", required=True, type=Path, help="a .pt2 written by pq-ao export"),
    arg("--prompt", required=True, help="text to continue (no BOS is added: the prefix ends with it)"),
    arg("--max-new-tokens", type=int, default=32),
    arg("--device", help="default: the device the package was compiled for"),
)  # fmt: skip
def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy text generation from a .pt2 alone (pq_ao.runtime: torch + the tokenizer stored in the archive)."""
    from pq_ao.runtime import load

    if not args.package.is_file():
        raise FileNotFoundError(f"no package at {args.package}")
    print(load(args.package, args.device).generate_text(args.prompt, args.max_new_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pq-ao", description="PrefixQuant for torchao: quantize and evaluate LLMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, args) in _SUBCOMMANDS.items():
        doc = (fn.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        for flags, kwargs in args:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pq-ao`; returns the exit code (argparse exits 2 itself on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"pq-ao {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
