"""Where a CUDA `.pt2` departs from eager (issue 5): one quantized model, the same prompt fed through the eager
`CacheProgram` and through each variant (the exported programs' `ep.module()`, `torch.compile`, the AOTI package,
the package with its weights inside the `.so`, the package compiled without the mutation-analysis memo), each
from a fresh cache, comparing the length and the cache codes after prefill and the logits of every step; then each variant's decode on the eager cache and its
prefill under the eager decode. HF `generate` with the int cache (check_deploy.py's reference) is compared too.

    python3 benchmarks/gpu/debug_deploy.py --model stories260k --out $OUT
    python3 benchmarks/gpu/debug_deploy.py --model smollm2-shaped --layers 4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path

import torch

import pq_ao
from pq_ao import runtime
from pq_ao.config import preset
from pq_ao.export import CacheProgram, cache_spec, compile_package, example_inputs, export_programs
from pq_ao.hf_compat import cache_kwarg
from pq_ao.kernels.triton import mutation_memo
from pq_ao.nn.kv_cache import QuantizedKVCache

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


def feed(prefill, decode, ids, spec, steps: int):
    """Greedy steps from a fresh cache; returns what each stage left behind."""
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
            for t in b["after_prefill"]["kv"])), "logits_rel_err": [float(f"{r:.2e}") for r in rel]}  # fmt: skip


def generate_tokens(model, ids, max_len: int, steps: int) -> list[int]:
    """HF `generate` with the int cache, as check_deploy.py's eager reference."""
    cache = QuantizedKVCache(model, max_len, batch_size=1)
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, disable_compile=True, pad_token_id=0,
                         **{cache_kwarg(model): cache})  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def without_memo() -> None:
    from torch._higher_order_ops import triton_kernel_wrap as twrap

    for fn_name in mutation_memo.ANALYSES:
        fn = getattr(twrap, fn_name, None)
        if getattr(fn, "_pq_ao_memo", None) is not None:
            setattr(twrap, fn_name, fn.__wrapped__)


def keep_wrappers(pt2: Path, out: Path, tag: str) -> None:
    """The programs' generated C++ wrappers (the kernel launches, with their arguments) out of the package."""
    with zipfile.ZipFile(pt2) as z:
        for name in z.namelist():
            if name.endswith(".wrapper.cpp"):
                program = name.split("/")[-2]
                (out / f"{tag}_{program}.wrapper.cpp").write_bytes(z.read(name))


def check(model, tok, ids, max_len: int, steps: int, variants: list[str], out: Path, keep_code: bool) -> dict:
    spec = cache_spec(model, 1, max_len)
    prog = CacheProgram(model).eval()
    eager = feed(prog, prog, ids, spec, steps)
    res = {"eager": compare(eager, eager)}
    res["generate_tokens"] = generate_tokens(model, ids, max_len, steps)
    res["generate_matches_eager_program"] = res["generate_tokens"] == eager["tokens"]
    for name in variants:
        t = time.perf_counter()
        if name == "exported":
            _, eps = export_programs(model, 1, max_len)
            prefill, decode = eps["prefill"].module(), eps["decode"].module()
        elif name == "compiled":  # inductor JIT, one static graph per shape (as bench_e2e)
            torch.compiler.reset()
            prefill = decode = torch.compile(prog, fullgraph=True, dynamic=False)
        else:
            if name == "aoti_no_memo":
                without_memo()
            pt2 = compile_package(model, out / f"{name}.pt2", 1, max_len, tok, weights_in_so=name == "aoti_in_so")
            if keep_code:
                keep_wrappers(pt2, out, f"{name}_{max_len}")
            pkg = runtime.load(pt2)
            prefill, decode = pkg.prefill, pkg.decode
        res[name] = compare(eager, feed(prefill, decode, ids, spec, steps))
        res[name]["seconds"] = time.perf_counter() - t
        # each program on the other's cache: this variant's decode after eager prefill, and vice versa
        res[name]["eager_prefill_then_its_decode"] = compare(eager, feed(prog, decode, ids, spec, steps))
        res[name]["its_prefill_then_eager_decode"] = compare(eager, feed(prefill, prog, ids, spec, steps))
        print(name, max_len, json.dumps({k: v for k, v in res[name].items() if not isinstance(v, dict)}), flush=True)
        (out / f"{name}.pt2").unlink(missing_ok=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k", help="a pq_ao.load_model name, or smollm2-shaped")
    p.add_argument("--gguf", help="load this GGUF instead of --model")
    p.add_argument("--layers", type=int, help="smollm2-shaped: layers (default 4); others: keep the first N")
    p.add_argument("--max-len", default="64", help="comma-separated cache lengths, one export each")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", default="exported,aoti",
                   help="of exported, compiled, aoti, aoti_in_so (weights in the .so), aoti_no_memo (last)")
    p.add_argument("--keep-code", action="store_true", help="write the packages' C++ wrappers to --out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok, ids = load(args.gguf or args.model, args.layers or 4, args.device)
    if args.model != "smollm2-shaped" and args.layers:  # the first N quantized layers
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    res = {"model": args.gguf or args.model, "layers": model.config.num_hidden_layers, "prompt_len": ids.shape[1],
           "prefix_ids": list(getattr(model, "pq_ao_prefix_ids", []) or []), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "runs": {}}  # fmt: skip
    path = args.out / f"debug_deploy_{Path(args.gguf or args.model).stem}_{res['layers']}l.json"
    with torch.no_grad():
        for max_len in map(int, args.max_len.split(",")):
            res["runs"][max_len] = check(model, tok, ids, max_len, args.steps, args.variants.split(","), args.out,
                                         args.keep_code)  # fmt: skip
            path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
