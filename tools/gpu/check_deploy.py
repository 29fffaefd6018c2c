"""GPU check of deployment (issue 5): quantize on CUDA, export prefill + decode to one AOTInductor .pt2, then in
fresh processes with no LD_PRELOAD: (a) plain `torch._inductor.package.load_package` (the crash our loader fixes,
if the box still has it), (b) `pq_ao/runtime.py` loaded standalone (no pq_ao import) generating from the package;
its tokens must equal the eager model's (int4 cache, greedy).

    python3 tools/gpu/check_deploy.py --model stories260k --dtype bf16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import pq_ao
from pq_ao.config import preset
from pq_ao.export import compile_package
from pq_ao.hf_compat import cache_kwarg
from pq_ao.nn.kv_cache import QuantizedKVCache
from pq_ao.numerics import DEFAULT as DEFAULT_NUMERICS
from pq_ao.numerics import NUMERICS

RUNTIME = Path(pq_ao.__file__).parent / "runtime.py"
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def _fresh(script: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    return {"rc": out.returncode, "seconds": time.perf_counter() - t, "stdout": out.stdout[-2000:],
            "stderr": out.stderr[-1500:]}  # fmt: skip


def run(model, tok, name: str, dtype_name: str, max_len: int, new_tokens: int, out: Path,
        numerics: str = DEFAULT_NUMERICS) -> dict:
    """Eager int4-cache generation vs the AOTI package in fresh processes, for a quantized CUDA model."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    row = {"model": name, "dtype": dtype_name, "device": torch.cuda.get_device_name(), "numerics": numerics}
    model.to(dtype)
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, disable_compile=True,
                               pad_token_id=tok.eos_token_id or 0,
                               **{cache_kwarg(model): QuantizedKVCache(model, max_len, batch_size=1)})  # fmt: skip
    eager = eager[:, : ids.shape[1] + new_tokens].cpu()
    row["eager_text"] = tok.decode(eager[0, ids.shape[1] :])
    t = time.perf_counter()
    pt2 = compile_package(model, out / f"{Path(name).stem}_{dtype_name}.pt2", 1, max_len, tok, numerics=numerics)
    row["aoti_compile_s"] = time.perf_counter() - t
    row["package_mib"] = pt2.stat().st_size / 2**20
    torch.save((ids.cpu(), eager), out / "io.pt")
    row["plain_load_no_preload"] = _fresh(textwrap.dedent(f"""
        import torch
        from torch._inductor.package import load_package
        m = load_package({str(pt2)!r}, model_name="decode")
        print("loaded", m.get_metadata()["program"])
    """))
    row["runtime_no_preload"] = _fresh(textwrap.dedent(f"""
        import importlib.util, sys, time, torch
        spec = importlib.util.spec_from_file_location("standalone_runtime", {str(RUNTIME)!r})
        rt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rt)
        ids, eager = torch.load({str(out / 'io.pt')!r})
        t = time.perf_counter()
        pkg = rt.load({str(pt2)!r})
        load_s = time.perf_counter() - t
        got = pkg.generate(ids, {new_tokens}).cpu()
        assert not any(k.split('.')[0] == 'pq_ao' for k in sys.modules), 'pq_ao got imported'
        n = min(got.shape[1], eager.shape[1])
        same = int((got[0, :n] == eager[0, :n]).all())
        first_diff = next((i for i in range(n) if got[0, i] != eager[0, i]), -1)
        print("RESULT", same, first_diff, rt._PRELOADED, round(load_s, 2))
        print("TEXT", pkg.generate_text({PROMPT!r}, {new_tokens}))
    """))
    stdout = row["runtime_no_preload"]["stdout"]
    row["identical_tokens"] = "RESULT 1 " in stdout
    row["package_text"] = stdout.split("TEXT", 1)[1].strip() if "TEXT" in stdout else None
    (out / f"check_deploy_{Path(name).stem}_{dtype_name}.json").write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k")
    p.add_argument("--config", default="w4a4kv4")
    p.add_argument("--dtype", default="bf16", help="comma-separated: bf16, fp32")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--calib", default='{"n_samples": 16, "grid_samples": 1}', help="config overrides (JSON)")
    p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS, help="compile_package's numerics")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype_name in args.dtype.split(","):
        model, tok = pq_ao.load_model(args.model, dtype=torch.float32, device="cuda")
        t = time.perf_counter()
        pq_ao.quantize_(model, preset(args.config, **json.loads(args.calib)), tokenizer=tok)
        row = {"quantize_s": time.perf_counter() - t,
               **run(model, tok, args.model, dtype_name, args.max_len, args.new_tokens, args.out, args.numerics)}
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
