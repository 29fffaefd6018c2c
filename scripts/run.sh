#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default model (SmolLM2-135M) and the local data:
# full-precision WikiText-2 perplexity, PrefixQuant W4A4KV4 quantization, the same evaluation of the saved
# quantized model, and a side-by-side table. On a 2-core CPU: about 20 minutes (first 40 windows of 2048 tokens;
# drop LIMIT= for the whole test set: LIMIT= bash scripts/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LIMIT=${LIMIT-40}
lim=${LIMIT:+--limit $LIMIT}
mkdir -p out
.venv/bin/pq-ao eval --model smollm2-135m --tasks wikitext2 $lim --json out/fp.json
.venv/bin/pq-ao quantize --model smollm2-135m --config w4a4kv4 --out out/smollm2-w4a4kv4 --json out/quantize.json
.venv/bin/pq-ao eval --model out/smollm2-w4a4kv4 --tasks wikitext2 $lim --json out/w4a4kv4.json
.venv/bin/python - <<'PY'
import json
fp, q = (json.load(open(f"out/{n}.json"))["results"]["wikitext2"] for n in ("fp", "w4a4kv4"))
print(f"\nWikiText-2 ppl @ {fp['seqlen']} ({fp['n_windows']} windows): full precision {fp['ppl']:.2f}, "
      f"PrefixQuant W4A4KV4 {q['ppl']:.2f}")
PY
