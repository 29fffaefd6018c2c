"""Where a CUDA `.pt2` departs from eager (issue 5): one quantized model, the same prompt fed through the eager
`CacheProgram`, the exported programs (`ep.module()`), and the AOTI package, each from a fresh cache, comparing
the length and the cache codes after prefill and the logits of every step; then each program's decode step on
the eager cache. `--no-memo` compiles a second package without the mutation-analysis memo.

    python3 benchmarks/gpu/debug_deploy.py --model stories260k --out $OUT
    python3 benchmarks/gpu/debug_deploy.py --model smollm2-shaped --layers 4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pq_ao
from pq_ao import runtime
from pq_ao.config import preset
from pq_ao.export import CacheProgram, cache_spec, compile_package, example_inputs, export_programs

PROMPT = "Once upon a time, in a small village by the sea, there lived"
# --model smollm2-shaped: SmolLM2-135M's attention and MLP shapes (9 query / 3 KV heads of 64), random weights
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, vocab_size=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048)  # fmt: skip


def load(name: str, layers: int, device: str):
    """(quantized model, tokenizer or None, prompt ids)."""
    if name != "smollm2-shaped":
        model, tok = pq_ao.load_model(name, dtype=torch.float32, device=device)
        pq_ao.quantize_(model, preset("w4a4kv4", n_samples=16, grid_samples=1), tokenizer=tok)
        return model, tok, tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2_SHAPES, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(10, config.vocab_size, (8, 256), generator=gen)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(calibration=calib, n_samples=8, grid_samples=1, grid_seqlen=256))
    return model, None, torch.randint(10, config.vocab_size, (1, 15), generator=gen).to(device)


def feed(prefill, decode, ids, spec, steps: int, kv=None, length=None):
    """Greedy steps from a fresh cache (or the given one); returns what each stage left behind."""
    if kv is None:
        _, length, *kv = example_inputs(spec, 2, ids.device)
    logits = [prefill(ids, length, *kv)]
    after = {"length": int(length), "kv": [t.clone() for t in kv]}
    toks = []
    for _ in range(steps):
        toks.append(int(logits[-1].argmax(-1)))
        logits.append(decode(torch.tensor([[toks[-1]]], device=ids.device), length, *kv))
    return {"tokens": toks, "logits": [x.float().cpu() for x in logits], "after_prefill": after,
            "final_length": int(length)}  # fmt: skip


def compare(a, b) -> dict:
    kv_diff = [int((x != y).sum()) for x, y in zip(a["after_prefill"]["kv"], b["after_prefill"]["kv"])]
    rel = [float((x - y).norm() / x.norm()) for x, y in zip(a["logits"], b["logits"])]
    return {"tokens": b["tokens"], "same_tokens": a["tokens"] == b["tokens"],
            "length_after_prefill": b["after_prefill"]["length"], "final_length": b["final_length"],
            "kv_codes_differing_after_prefill": kv_diff[:6], "kv_nonzero": int(sum(int(t.count_nonzero())
            for t in b["after_prefill"]["kv"])), "logits_rel_err": [round(r, 6) for r in rel]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k")
    p.add_argument("--gguf")
    p.add_argument("--layers", type=int, default=4, help="smollm2-shaped only")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--no-memo", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok, ids = load(args.gguf or args.model, args.layers, args.device)
    spec = cache_spec(model, 1, args.max_len)
    res = {"model": args.model, "prompt_len": ids.shape[1], "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "torch": torch.__version__}  # fmt: skip
    with torch.no_grad():
        prog = CacheProgram(model).eval()
        eager = feed(prog, prog, ids, spec, args.steps)
        res["eager"] = compare(eager, eager)
        _, eps = export_programs(model, 1, args.max_len)
        mods = {k: ep.module() for k, ep in eps.items()}
        res["exported"] = compare(eager, feed(mods["prefill"], mods["decode"], ids, spec, args.steps))
        print(json.dumps(res, indent=1), flush=True)
        variants = [("aoti", False)] + ([("aoti_no_memo", True)] if args.no_memo else [])
        for name, no_memo in variants:
            if no_memo:
                from torch._higher_order_ops import triton_kernel_wrap as twrap

                for fn_name in ("identify_accessed_tensors", "identify_mutated_tensors"):
                    fn = getattr(twrap, fn_name, None)
                    if getattr(fn, "_pq_ao_memo", None) is not None:
                        setattr(twrap, fn_name, fn.__wrapped__)
            t = time.perf_counter()
            pkg = runtime.load(compile_package(model, args.out / f"{name}.pt2", 1, args.max_len, tok))
            res[name] = compare(eager, feed(pkg.prefill, pkg.decode, ids, spec, args.steps))
            res[name]["compile_s"] = time.perf_counter() - t
            # each program alone on the eager cache: the package's decode after eager prefill, and vice versa
            _, length, *kv = example_inputs(spec, 2, ids.device)
            mixed = feed(prog, pkg.decode, ids, spec, args.steps, kv, length)
            res[name]["eager_prefill_then_pkg_decode"] = compare(eager, mixed)
            _, length, *kv = example_inputs(spec, 2, ids.device)
            mixed = feed(pkg.prefill, prog, ids, spec, args.steps, kv, length)
            res[name]["pkg_prefill_then_eager_decode"] = compare(eager, mixed)
            print(json.dumps(res[name], indent=1), flush=True)
            (args.out / f"debug_deploy_{args.model}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"debug_deploy_{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
