"""Small random decoders of several families, sized to exercise K * 2**m Hadamards and GQA.

| name        | hidden (R1)  | intermediate (R4) | heads / kv x head_dim | extra                         |
|-------------|--------------|-------------------|-----------------------|-------------------------------|
| qwen2       | 96 = 12*8    | 160 = 20*8        | 6 / 2 x 16            | q/k/v biases, tied embeddings |
| qwen3       | 112 = 28*4   | 144 = 36*4        | 4 / 2 x 16            | q_norm/k_norm, head_dim set   |
| mistral     | 120 = 60*2   | 208 = 52*4        | 4 / 2 x 32            | sliding window 6              |
| llama_eager | 90 (fallback)| 140 = 140*1       | 3 / 1 x 16            | eager attention, o_proj bias  |

Norm weights and biases are randomised so that folding and bias rotation are not trivially exact.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


def _randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# kind -> (transformers family prefix, config kwargs); see the table above
_TINY = {
    "qwen2": ("Qwen2", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(hidden_size=112, intermediate_size=144, num_attention_heads=4, head_dim=16)),
    "mistral": ("Mistral", dict(hidden_size=120, intermediate_size=208, num_attention_heads=4, head_dim=32,
                                sliding_window=6)),
    "llama_eager": ("Llama", dict(hidden_size=90, intermediate_size=140, num_attention_heads=3, num_key_value_heads=1,
                                  head_dim=16, attention_bias=True, attn_implementation="eager")),
}  # fmt: skip


def make_tiny(kind: str):
    import transformers

    family, kwargs = _TINY[kind]
    kwargs = (
        dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, num_key_value_heads=2)
        | kwargs
    )
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**kwargs)
    return _randomise(getattr(transformers, f"{family}ForCausalLM")(config))


@pytest.fixture
def tiny():
    """`tiny(kind)`: a fresh random model, kind in qwen2, qwen3, mistral, llama_eager (table above)."""
    return make_tiny


@pytest.fixture
def stories_copy(stories):
    """A private fp32 copy of the session's stories260K (tests mutate it)."""
    import copy

    return copy.deepcopy(stories[0])
