"""GPTQ-style perplexity: WikiText-2 test as one string, non-overlapping windows, the tail dropped.

The text is tokenized once with `add_special_tokens=False`: no BOS anywhere. A model carrying a PrefixQuant
prefix has its BOS inside the prefix (kept as KV in its attention modules), so a prefix model and a plain
model are scored on exactly the same tokens. The model is called as
`model(input_ids=batch, use_cache=False).logits`, nothing else: no attention mask, no cache.

Every window of `seqlen` tokens predicts its last `seqlen - 1` tokens; ppl = exp(mean NLL over all predicted
tokens), the NLL taken in fp32 from `log_softmax(logits.float())`, a chunk of positions at a time (memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from pq_ao import data

_CHUNK = 512  # positions per log_softmax: [batch, 512, vocab] fp32 at a time


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_tokens(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.LongTensor:
    """`[n_windows, seqlen]` non-overlapping windows of the tokenized `text` (tail dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"seqlen {seqlen} is longer than the tokenized text ({ids.numel()} tokens)")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def _window_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum over the batch of -log p(token t+1 | tokens <= t), for t < seqlen - 1."""
    total = 0.0
    n_pred = input_ids.shape[1] - 1
    for start in range(0, n_pred, _CHUNK):
        stop = min(start + _CHUNK, n_pred)
        logp = torch.log_softmax(logits[:, start:stop].float(), dim=-1)
        target = input_ids[:, start + 1 : stop + 1].unsqueeze(-1)
        total -= logp.gather(-1, target).sum().item()
    return total


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    prefix_ids: list[int] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on a text dataset of `pq_ao.data` (`wikitext2` or `wikitext2_valid`).

    `prefix_ids`: token ids put in front of every window and not scored (PrefixQuant's prefix given to a full-
    precision model, the "FP + prefix" row of the ablation): the same windows and predicted tokens as without."""
    text = data.load(dataset)
    if not isinstance(text, str):
        raise ValueError(
            f"perplexity needs a single-text dataset (wikitext2, wikitext2_valid), got {dataset!r}"
        )
    windows = window_tokens(tokenizer, text, seqlen, max_windows)
    device = next(model.parameters()).device
    prefix = torch.tensor(prefix_ids or [], dtype=torch.long)
    start = time.perf_counter()
    nll = 0.0
    for i in tqdm(range(0, len(windows), batch_size), desc=f"ppl {dataset}@{seqlen}", disable=not progress):
        batch = windows[i : i + batch_size]
        inputs = torch.cat([prefix.expand(len(batch), -1), batch], dim=1).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[:, len(prefix) :]
        nll += _window_nll_sum(logits, inputs[:, len(prefix) :])
    n_tokens = len(windows) * (seqlen - 1)
    mean = nll / n_tokens
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        n_windows=len(windows),
        n_tokens=n_tokens,
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )
