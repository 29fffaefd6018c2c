"""Where a CUDA `.pt2` departs from eager (issue 5): one quantized model, the same prompt fed through the eager
`CacheProgram` and through each variant, each from a fresh cache, comparing the length and the cache codes after
prefill and the logits of every step; for two-program variants also each variant's decode on the eager cache and
its prefill under the eager decode. HF `generate` with the int cache (check_deploy.py's reference) is compared too.

Variants (`--variants`):
- `exported`: the exported programs' `ep.module()`; `compiled`: `torch.compile` of `CacheProgram`;
- `aoti`: the `.pt2` of `compile_package`; `aoti_in_so`: with the weights inside each `.so`; `aoti_no_memo`:
  compiled without the mutation-analysis memo (run it last: the memo stays off);
- `aoti_decode`: the decode program alone through AOTI (prefill eager): a third of the compile time of `aoti`;
  with `--sanitize`, that package also runs two decode steps under compute-sanitizer (memcheck, initcheck) in a
  fresh process without the CUDA caching allocator, so that an access outside a buffer is outside an allocation;
- `aoti_decode_layers`: the same for a decode program that also returns every decoder layer's output at the last
  position, compared layer by layer (the first layer that departs; its graph differs, so it may not reproduce);
- `aoti_decode_eager_numerics`: `aoti_decode` compiled with torch's own eager-parity switches alone
  (`pq_ao.numerics.inductor_options`);
- `aoti_decode_aten_numerics`: `aoti_decode` with `numerics="eager"` (`pq_ao.numerics`: those switches, and ATen's
  own kernels for the ops that can still round otherwise);
- `compiled_decode`: `torch.compile` of the decode program alone (inductor without AOTI);
- `eager_noise`: eager with every layer's output perturbed by a relative 1e-6 (`text_sensitivity.LayerNoise`),
  the noise floor: how far a correct implementation with other rounding goes.

Besides the greedy run, each variant is also fed the eager tokens (teacher forcing, `forced`): with the same inputs
at every step its logits differ from eager's by rounding alone, and `forced_top1_agreement` says how often the
argmax still agrees. The static 4-bit grids make the greedy text itself depend on single ulps
(`benchmarks/text_sensitivity.py`), so the forced numbers are the ones to compare against the noise floor.

`--layers 30,12,6` (real models, descending) quantizes once and checks the first N layers for each N.

    python3 tools/gpu/debug_deploy.py --model stories260k --out $OUT
    python3 tools/gpu/debug_deploy.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --config defaults \\
        --layers 30,12 --max-len 256 --variants aoti_decode,aoti_decode_layers --sanitize --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from torch._inductor.package import package_aoti

import pq_ao
from pq_ao import numerics, runtime
from pq_ao.config import preset
from pq_ao.export import (
    CacheProgram,
    aot_compile_program,
    cache_spec,
    compile_package,
    example_inputs,
    export_programs,
)
from pq_ao.hf_compat import cache_kwarg
from pq_ao.kernels.triton import mutation_memo
from pq_ao.nn.kv_cache import QuantizedKVCache
from pq_ao.state import state_of

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from text_sensitivity import LayerNoise  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
# --model smollm2-shaped: SmolLM2-135M's attention and MLP shapes (9 query / 3 KV heads of 64), random weights
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, vocab_size=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048)  # fmt: skip
DECODE_ONLY = ("aoti_decode", "aoti_decode_layers", "aoti_decode_eager_numerics", "aoti_decode_aten_numerics",
               "compiled_decode", "eager_noise")  # fmt: skip


def load(name: str, layers: int, device: str, config: str):
    """(quantized model, tokenizer or None, prompt ids). config: "fast" (16 samples, 1 grid sample) or
    "defaults" (`prefixquant_w4a4()`, as check_smollm2.py quantizes)."""
    if name != "smollm2-shaped":
        model, tok = pq_ao.load_model(name, dtype=torch.float32, device=device)
        cfg = pq_ao.prefixquant_w4a4() if config == "defaults" else preset("w4a4kv4", n_samples=16, grid_samples=1)
        pq_ao.quantize_(model, cfg, tokenizer=tok)
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


def keep_layers(model, n: int) -> None:
    """Keep the first n (quantized) decoder layers."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n


class LayerOutputs(CacheProgram):
    """`CacheProgram` that also returns every decoder layer's output at the last position, `[L, B, hidden]`."""

    def forward(self, input_ids, length, *kv):
        outs = []

        def keep(module, args, output):
            outs.append((output[0] if isinstance(output, tuple) else output)[:, -1])

        hooks = [layer.register_forward_hook(keep) for layer in self.model.model.layers]
        try:
            logits = super().forward(input_ids, length, *kv)
        finally:
            for h in hooks:
                h.remove()
        return logits, torch.stack(outs)


def feed(prefill, decode, ids, spec, steps: int, forced: list[int] | None = None):
    """Greedy steps (or the `forced` tokens) from a fresh cache; returns what each stage left behind (and, from a
    decode that returns them, the layer outputs of every decode step)."""
    _, length, *kv = example_inputs(spec, 2, ids.device)
    logits = [prefill(ids, length, *kv)]
    after = {"length": int(length), "kv": [t.clone() for t in kv]}
    toks, layers = [], []
    for i in range(steps):
        toks.append(int(logits[-1].argmax(-1)) if forced is None else forced[i])
        out = decode(torch.tensor([[toks[-1]]], device=ids.device), length, *kv)
        if isinstance(out, (tuple, list)):
            out, hidden = out
            layers.append(hidden.float().cpu())
        logits.append(out)
    return {"tokens": toks, "logits": [x.float().cpu() for x in logits], "after_prefill": after,
            "final_length": int(length), "layers": layers}  # fmt: skip


def _rel(x, y) -> float:
    return float((x - y).norm() / x.norm())


def compare(a, b) -> dict:
    kv_diff = [int((x != y).sum()) for x, y in zip(a["after_prefill"]["kv"], b["after_prefill"]["kv"])]
    rel = [_rel(x, y) for x, y in zip(a["logits"], b["logits"])]
    top1 = [int(x.argmax(-1)) == int(y.argmax(-1)) for x, y in zip(a["logits"], b["logits"])]
    res = {"tokens": b["tokens"], "same_tokens": a["tokens"] == b["tokens"], "top1_agreement": sum(top1) / len(top1),
           "length_after_prefill": b["after_prefill"]["length"], "final_length": b["final_length"],
           "kv_codes_differing_after_prefill": kv_diff[:6], "kv_nonzero": int(sum(int(t.count_nonzero())
           for t in b["after_prefill"]["kv"])), "logits_rel_err": [float(f"{r:.2e}") for r in rel]}  # fmt: skip
    if a["layers"] and b["layers"]:  # per decode step, per layer
        per_step = [[float(f"{_rel(x[i], y[i]):.2e}") for i in range(x.shape[0])] for x, y in zip(a["layers"], b["layers"])]
        res["layer_rel_err"] = per_step
        res["first_departing_layer"] = [next((i for i, r in enumerate(s) if r > 1e-4), None) for s in per_step]
    return res


def generate_tokens(model, ids, max_len: int, steps: int) -> list[int]:
    """HF `generate` with the int cache, as check_deploy.py's eager reference."""
    cache = QuantizedKVCache(model, max_len, batch_size=1)
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, disable_compile=True, pad_token_id=0,
                         **{cache_kwarg(model): cache})  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def keep_wrappers(pt2: Path, out: Path, tag: str) -> None:
    """The programs' generated C++ wrappers (the kernel launches, with their arguments) out of the package."""
    with zipfile.ZipFile(pt2) as z:
        for name in z.namelist():
            if name.endswith(".wrapper.cpp"):
                program = name.split("/")[-2]
                (out / f"{tag}_{program}.wrapper.cpp").write_bytes(z.read(name))


def decode_package(model, max_len: int, pt2: Path, program=None, options: dict | None = None,
                   numerics: str = "inductor") -> Path:
    """A `.pt2` holding the decode program alone (weights as `compile_package` stores them)."""
    spec, eps = export_programs(model, 1, max_len, programs=("decode",), program=program)
    files = aot_compile_program(eps["decode"], "decode", spec, options=options, numerics=numerics)
    package_aoti(str(pt2), {"decode": files})
    return pt2


_SANITIZED_RUN = """
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("standalone_runtime", {runtime!r})
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
rt.preload_libstdcxx()
decode = rt.load_programs({pt2!r})["decode"]
meta = json.loads(decode.get_metadata()["pq_ao"])
dev = meta["device"]
g = torch.Generator(device=dev).manual_seed(0)
kv = [torch.randint(0, 100, meta["kv_shape"], device=dev, generator=g).to(getattr(torch, meta["kv_dtype"]))
      for _ in range(2 * meta["n_layers"])]
length = torch.tensor([15], device=dev)
for _ in range(2):
    out = decode(torch.ones(1, 1, dtype=torch.long, device=dev), length, *kv)
print("DECODED", int(length))
"""


def sanitized_run_script(pt2: Path) -> str:
    """The Python source that the sanitizer runs: two decode steps of `pt2` on a random cache, pq_ao not
    imported (runtime.py loaded as a file)."""
    return _SANITIZED_RUN.format(runtime=str(Path(runtime.__file__)), pt2=str(pt2))


def sanitize(pt2: Path) -> dict:
    """Two decode steps of the package under compute-sanitizer's memcheck and initcheck (a fresh process, no
    caching allocator: every buffer is its own allocation)."""
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        return {"error": "compute-sanitizer not found"}
    script = sanitized_run_script(pt2)
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    res = {}
    for check in ("memcheck", "initcheck"):
        t = time.perf_counter()
        try:
            p = subprocess.run([tool, "--tool", check, "--print-limit", "8", sys.executable, "-c", script],
                               capture_output=True, text=True, timeout=240, env=env)  # fmt: skip
            text = p.stdout + p.stderr
            summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or "DECODED" in ln]
            res[check] = {"rc": p.returncode, "seconds": time.perf_counter() - t, "summary": summary,
                          "head": text[:3000]}  # fmt: skip
        except subprocess.TimeoutExpired:
            res[check] = {"error": "timed out", "seconds": time.perf_counter() - t}
        print(check, json.dumps({k: v for k, v in res[check].items() if k != "head"}), flush=True)
    return res


def check(model, tok, ids, max_len: int, steps: int, variants: list[str], out: Path, keep_code: bool,
          run_sanitizer: bool) -> dict:
    spec = cache_spec(model, 1, max_len)
    prog = CacheProgram(model).eval()
    eager = feed(prog, prog, ids, spec, steps)
    res = {"eager": compare(eager, eager)}
    res["generate_tokens"] = generate_tokens(model, ids, max_len, steps)
    res["generate_matches_eager_program"] = res["generate_tokens"] == eager["tokens"]
    eager_layers = None
    tag = f"{spec['n_layers']}l_{max_len}"
    for name in variants:
        t = time.perf_counter()
        pt2 = None
        if name == "exported":
            _, eps = export_programs(model, 1, max_len)
            prefill, decode = eps["prefill"].module(), eps["decode"].module()
        elif name == "compiled":  # inductor JIT, one static graph per shape (as bench_e2e)
            torch.compiler.reset()
            prefill = decode = torch.compile(prog, fullgraph=True, dynamic=False)
        elif name == "compiled_decode":
            torch.compiler.reset()
            prefill, decode = prog, torch.compile(CacheProgram(model).eval(), fullgraph=True, dynamic=False)
        elif name == "eager_noise":
            prefill, decode = prog, prog
        elif name in ("aoti_decode", "aoti_decode_layers", "aoti_decode_eager_numerics", "aoti_decode_aten_numerics"):
            layered = LayerOutputs(model).eval() if name == "aoti_decode_layers" else None
            options = numerics.inductor_options() if name == "aoti_decode_eager_numerics" else None
            mode = "eager" if name == "aoti_decode_aten_numerics" else "inductor"
            res.setdefault("inductor_options", {})[name] = {"options": options, "numerics": mode}
            pt2 = decode_package(model, max_len, out / f"{name}.pt2", layered, options, mode)
            runtime.preload_libstdcxx()
            prefill, decode = prog, runtime.load_programs(pt2)["decode"]
            if layered is not None and eager_layers is None:
                eager_layers = feed(prog, layered, ids, spec, steps)
        else:
            if name == "aoti_no_memo":
                mutation_memo.uninstall()
            pt2 = compile_package(model, out / f"{name}.pt2", 1, max_len, tok, weights_in_so=name == "aoti_in_so")
            pkg = runtime.load(pt2)
            prefill, decode = pkg.prefill, pkg.decode
        if pt2 is not None and keep_code:
            keep_wrappers(pt2, out, f"{name}_{tag}")
        reference = eager_layers if name == "aoti_decode_layers" else eager
        noise = LayerNoise(model, 1e-6, seed=0) if name == "eager_noise" else None
        try:
            res[name] = compare(reference, feed(prefill, decode, ids, spec, steps))
            res[name]["forced"] = compare(reference, feed(prefill, decode, ids, spec, steps, reference["tokens"]))
        finally:
            if noise is not None:
                noise.remove()
        res[name]["seconds"] = time.perf_counter() - t
        if name not in DECODE_ONLY:  # each program on the other's cache
            res[name]["eager_prefill_then_its_decode"] = compare(eager, feed(prog, decode, ids, spec, steps))
            res[name]["its_prefill_then_eager_decode"] = compare(eager, feed(prefill, prog, ids, spec, steps))
        summary = {k: v for k, v in res[name].items() if not isinstance(v, dict) and k != "layer_rel_err"}
        forced = res[name]["forced"]
        summary["forced"] = {k: forced[k] for k in ("top1_agreement", "logits_rel_err", "first_departing_layer")
                             if k in forced}  # fmt: skip
        print(name, tag, json.dumps(summary), flush=True)
        if name == "aoti_decode" and run_sanitizer:
            res[name]["sanitizer"] = sanitize(pt2)
        if pt2 is not None:
            pt2.unlink(missing_ok=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260k", help="a pq_ao.load_model name, or smollm2-shaped")
    p.add_argument("--gguf", help="load this GGUF instead of --model")
    p.add_argument("--layers", default="", help="comma-separated, descending: keep the first N layers, for each N "
                   "(smollm2-shaped: the model has the largest; default 4)")  # fmt: skip
    p.add_argument("--config", default="fast", choices=("fast", "defaults"))
    p.add_argument("--max-len", default="64", help="comma-separated cache lengths, one export each")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", default="exported,aoti", help="comma-separated, of: see the module docstring")
    p.add_argument("--sanitize", action="store_true", help="aoti_decode: also under compute-sanitizer")
    p.add_argument("--keep-code", action="store_true", help="write the packages' C++ wrappers to --out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    layer_counts = sorted({int(n) for n in args.layers.split(",") if n}, reverse=True)
    model, tok, ids = load(args.gguf or args.model, layer_counts[0] if layer_counts else 4, args.device, args.config)
    name = Path(args.gguf or args.model).stem
    with torch.no_grad():
        for n in layer_counts or [model.config.num_hidden_layers]:
            keep_layers(model, n)
            res = {"model": args.gguf or args.model, "layers": n, "config": args.config, "prompt_len": ids.shape[1],
                   "prefix_ids": list(state_of(model).prefix_ids), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                   "runs": {}}  # fmt: skip
            path = args.out / f"debug_deploy_{name}_{n}l.json"
            for max_len in map(int, args.max_len.split(",")):
                res["runs"][max_len] = check(model, tok, ids, max_len, args.steps, args.variants.split(","),
                                             args.out, args.keep_code, args.sanitize)  # fmt: skip
                path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
