#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default model (SmolLM2-135M) and the local data:
# full-precision WikiText-2 perplexity, then PrefixQuant W4A4KV4 quantization and the same evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/pq-ao eval --model smollm2-135m --tasks wikitext2 --json out/fp.json
.venv/bin/pq-ao quantize --model smollm2-135m --config w4a4kv4 --out out/smollm2-w4a4kv4
.venv/bin/pq-ao eval --model out/smollm2-w4a4kv4 --tasks wikitext2 --json out/w4a4kv4.json
