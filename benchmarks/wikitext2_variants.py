"""Why WikiText-2 ppl differs between scripts: GPTQ's string or the raw file, bf16 or fp32, our NLL or HF's.

    python benchmarks/wikitext2_variants.py MODEL DEVICE OUT.json DTYPES [MAX_WINDOWS]
    e.g. python benchmarks/wikitext2_variants.py smollm2-135m cuda out.json bf16,fp32

For each dtype, seqlen 2048, batch 1: `join` is `pq_ao.data.load("wikitext2")` ("\\n\\n".join of the HF
rows, what `pq-ao eval` scores), `raw` the file's content as is (skipped with MAX_WINDOWS). `ppl` uses pq_ao's
NLL code, `ppl_hf_loss` the model's own `labels=` loss averaged over windows; they must agree.
"""

import json
import math
import sys
import time

import torch

from pq_ao import data
from pq_ao.eval.perplexity import _window_nll_sum, window_tokens
from pq_ao.models import load_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    model_arg, device, out = sys.argv[1:4]
    max_windows = int(sys.argv[5]) if len(sys.argv) > 5 else None
    texts = {"join": data.load("wikitext2"), "raw": data.local_files("wikitext2")[0].read_text()}
    results = {}
    for dt in sys.argv[4].split(","):
        model, tok = load_model(model_arg, dtype=DTYPES[dt], device=device)
        for name, text in texts.items():
            if max_windows and name == "raw":
                continue
            windows = window_tokens(tok, text, 2048, max_windows)
            nll = hf_loss = 0.0
            start = time.time()
            with torch.no_grad():
                for w in windows:
                    b = w[None].to(device)
                    o = model(input_ids=b, labels=b, use_cache=False)
                    nll += _window_nll_sum(o.logits, b)
                    hf_loss += o.loss.item()
            results[f"{dt}_{name}"] = {
                "ppl": math.exp(nll / (len(windows) * 2047)),
                "ppl_hf_loss": math.exp(hf_loss / len(windows)),
                "n_windows": len(windows),
                "tokens_in_text": len(tok(text, add_special_tokens=False)["input_ids"]),
                "s": time.time() - start,
            }
            print(dt, name, results[f"{dt}_{name}"], flush=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
