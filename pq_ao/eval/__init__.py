"""Evaluation of a causal LM in memory (quantized or not).

`pq_ao.eval.perplexity`: GPTQ-style WikiText-2 perplexity. `pq_ao.eval.zeroshot`: lm-eval zero-shot tasks on
local data. `pq_ao.eval.report`: a readable table of both.
"""
