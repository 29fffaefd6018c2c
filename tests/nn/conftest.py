"""Shared model for the GPU tests of tests/nn."""

import pytest
import torch


@pytest.fixture
def tiny_w4a4_llama():
    """A 2-layer random Llama (GQA, 4 heads over 2 KV heads) through `prefixquant_w4a4` on random calibration ids,
    without grid search: seconds to build, every kernel of the real model (fused q/k/v and gate/up, int4 KV)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import pq_ao

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    calib = torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    pq_ao.quantize_(model, pq_ao.prefixquant_w4a4(calibration=calib, n_samples=4, seqlen=64, grid_samples=1,
                                                  grid_seqlen=64, grid_search=False))  # fmt: skip
    return model
