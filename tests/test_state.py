"""`PrefixQuantState`: one record per model at `model.config.quantization_config`."""

from __future__ import annotations

import copy

import pytest
import torch

import pq_ao
from pq_ao import prefixquant_w4a4
from pq_ao.state import PrefixQuantState, require_state, state_of

SMALL = dict(n_samples=4, seqlen=64, grid_samples=1, grid_seqlen=64)


@pytest.fixture(scope="module")
def quantized():
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    report = pq_ao.quantize_(model, prefixquant_w4a4(**SMALL))
    return model, tok, report


def test_load_model_records_source_and_tokenizer():
    model, tok = pq_ao.load_model("stories260k", dtype=torch.float32)
    state = state_of(model)
    assert state.source == "stories260k" and state.tokenizer is tok and not state.quantized


def test_quantize_fills_the_state(quantized):
    model, tok, report = quantized
    state = state_of(model)
    assert state.quantized and state.report is report and state.config.name == "w4a4kv4"
    assert state.rotation["seed"] == 0 and state.prefix_ids == report.prefix.prefix_ids
    assert state.tokenizer is tok and model.config.quantization_config is state


def test_round_trip_through_dict(quantized):
    state = state_of(quantized[0])
    back = PrefixQuantState.from_dict(state.to_dict())
    assert back.to_dict() == state.to_dict() and back.tokenizer is None and back.hooks == []


def test_quantizing_twice_is_refused(quantized):
    with pytest.raises(ValueError, match="already quantized by pq_ao"):
        pq_ao.quantize_(quantized[0], prefixquant_w4a4(**SMALL))


def test_another_librarys_quantization_is_refused():
    model, _ = pq_ao.load_model("stories260k", dtype=torch.float32)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="already quantized \\(gptq\\)"):
        require_state(model)


def test_a_deep_copy_has_its_own_guard(quantized):
    """The BOS-guard handle of a copied model removes the copy's hook, not the original's."""
    from pq_ao.nn.attention import PrefixAttention
    from pq_ao.passes.prefix import remove_prefix

    model, tok, _ = quantized
    twin = copy.deepcopy(model)
    assert state_of(twin) is not state_of(model) and state_of(twin).tokenizer is tok
    remove_prefix(twin, [m for m in twin.modules() if isinstance(m, PrefixAttention)])
    bos = torch.tensor([[tok.bos_token_id, 5, 6]])
    with torch.no_grad():
        twin(input_ids=bos)  # the copy has no prefix and no guard any more
    with pytest.raises(ValueError, match="BOS"):
        model(input_ids=bos)  # the original keeps both
