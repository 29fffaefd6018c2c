"""How far a quantized model's greedy text depends on rounding: eager generation (int4 cache), then the same with
every decoder layer's output multiplied by (1 + eps * N(0, 1)) at every step, for a few eps and seeds.

With static 4-bit activations a difference of one ulp can move a value across a rounding boundary: that code then
changes by a whole grid step, and later layers carry the change on. If a 1e-6 perturbation already changes the
text, then "the same text as eager" holds only for an implementation whose arithmetic is bitwise eager's. A
compiled program (inductor fuses, reorders reductions and contracts a * b + c into FMAs) can be correct yet generate
another text. This script measures that noise floor: the greedy text of each run, where it first departs, and the
teacher-forced logits on the eager text (relative error, top-1 agreement).

    python3 benchmarks/text_sensitivity.py --model smollm2-135m --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pq_ao
from pq_ao.hf_compat import cache_kwarg
from pq_ao.nn.kv_cache import QuantizedKVCache

PROMPT = "Once upon a time, in a small village by the sea, there lived"  # as tools/gpu/check_deploy.py


class LayerNoise:
    """Forward hooks multiplying each decoder layer's output by (1 + eps * N(0, 1)), seeded."""

    def __init__(self, model, eps: float, seed: int):
        self.eps, self.gen = eps, torch.Generator().manual_seed(seed)
        self.hooks = [layer.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        noise = torch.randn(h.shape, generator=self.gen).to(h.device, h.dtype)
        h = h * (1 + self.eps * noise)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def greedy(model, ids, new_tokens: int, max_len: int) -> list[int]:
    cache = QuantizedKVCache(model, max_len, batch_size=ids.shape[0])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, disable_compile=True, pad_token_id=0,
                         **{cache_kwarg(model): cache})  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def forced_logits(model, ids, continuation: list[int]) -> torch.Tensor:
    """Logits predicting each continuation token, teacher-forced on it, [len(continuation), V]."""
    full = torch.cat([ids, torch.tensor([continuation], device=ids.device)], 1)
    logits = model(full).logits[0, ids.shape[1] - 1 : -1]
    return logits.float().cpu()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--eps", default="1e-6,1e-4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    t = time.perf_counter()
    model, tok = pq_ao.load_model(args.model, dtype=torch.float32, device=args.device)
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(), tokenizer=tok)
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(args.device)
    max_len = ids.shape[1] + args.new_tokens + 1
    base = greedy(model, ids, args.new_tokens, max_len)
    base_logits = forced_logits(model, ids, base)
    row = {"model": args.model, "config": "prefixquant_w4a4() defaults", "device": args.device,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "prompt": PROMPT,
           "quantize_and_base_s": time.perf_counter() - t, "eager_text": tok.decode(base), "runs": []}  # fmt: skip
    print(json.dumps({"eager_text": row["eager_text"]}), flush=True)
    for eps in map(float, args.eps.split(",")):
        for seed in range(args.seeds):
            noise = LayerNoise(model, eps, seed)
            try:
                toks = greedy(model, ids, args.new_tokens, max_len)
                logits = forced_logits(model, ids, base)
            finally:
                noise.remove()
            rel = ((logits - base_logits).norm(dim=-1) / base_logits.norm(dim=-1)).tolist()
            run = {"eps": eps, "seed": seed, "text": tok.decode(toks),
                   "first_differing_token": next((i for i, (a, b) in enumerate(zip(base, toks)) if a != b), None),
                   "forced_top1_agreement": float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean()),
                   "forced_logits_rel_err_median": float(torch.tensor(rel).median()),
                   "forced_logits_rel_err_max": max(rel)}  # fmt: skip
            row["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"text_sensitivity_{args.model}_{args.device}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
